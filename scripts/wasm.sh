#!/usr/bin/env bash
# Build (or clippy-check) the filter crates for wasm32-wasip1 and copy the modules to build/.
#
#   scripts/wasm.sh build [FILTER...]    # release build, modules in build/tollgate_<filter>.wasm
#   scripts/wasm.sh clippy [FILTER...]   # clippy -D warnings for the wasm target
# FILTER is auth, ratelimit, cache or aggregate; default: all four.
#
# Toolchain choice, made automatically:
#   1. rustup's toolchain when `rustup target list --installed` shows wasm32-wasip1;
#   2. else `rustup target add wasm32-wasip1`, but only if the rustup server answers within
#      a few seconds (it is out of reach on some networks, where it would hang);
#   3. else Debian's rustc-web / cargo-web with the standard library built from source
#      (-Zbuild-std), installing the apt packages when missing.
# The choice is remembered in target/.wasm-toolchain; delete it to choose again.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-build}
shift || true
TARGET=wasm32-wasip1
PACKAGES=(tollgate-auth tollgate-ratelimit tollgate-cache tollgate-aggregate tollgate-probe)
if [ $# -gt 0 ]; then
  PACKAGES=()
  for f in "$@"; do PACKAGES+=("tollgate-$f"); done
fi
DEBIAN_PKGS=(rustc-web cargo-web rust-web-src lld-22 wasi-libc)
[ "$MODE" = clippy ] && DEBIAN_PKGS+=(rust-web-clippy)
CHOICE_FILE=target/.wasm-toolchain
mkdir -p target build

log() { echo "wasm: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

have_rustup_target() {
  command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -qx "$TARGET"
}

try_rustup_add() {
  command -v rustup >/dev/null || return 1
  local server=${RUSTUP_DIST_SERVER:-https://static.rust-lang.org}
  if ! curl -sS --max-time 5 -o /dev/null "$server/dist/channel-rust-stable.toml.sha256" 2>/dev/null; then
    log "rustup server $server is out of reach; using Debian's toolchain"
    return 1
  fi
  log "adding $TARGET with rustup"
  timeout 300 rustup target add "$TARGET" >&2 && have_rustup_target
}

ensure_debian() {
  local missing=()
  for p in "${DEBIAN_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} with apt"
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
}

choose() {
  local c=""
  [ -f "$CHOICE_FILE" ] && c=$(cat "$CHOICE_FILE")
  if [ "$c" = rustup ] && have_rustup_target; then echo rustup; return; fi
  if [ "$c" = debian ]; then echo debian; return; fi
  if have_rustup_target || try_rustup_add; then c=rustup; else c=debian; fi
  echo "$c" >"$CHOICE_FILE"
  echo "$c"
}

TOOLCHAIN=$(choose)
# Reproducible modules: panic locations embed source paths; map the machine-specific ones (the
# Cargo home with the registry sources, the checkout) to fixed names, so the same sources and
# toolchain give the same bytes anywhere (the image digests in deploy/ depend on it).
REMAP="--remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo --remap-path-prefix=$PWD=/tollgate"
PKG_ARGS=()
for p in "${PACKAGES[@]}"; do PKG_ARGS+=(-p "$p"); done

if [ "$TOOLCHAIN" = rustup ]; then
  OUT=target/$TARGET/release
  # Only the wasm32 artifacts get these flags (with --target, RUSTFLAGS skip build scripts).
  export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }$REMAP"
  case "$MODE" in
    build) cargo build --release --target "$TARGET" "${PKG_ARGS[@]}" ;;
    clippy) cargo clippy --release --target "$TARGET" "${PKG_ARGS[@]}" -- -D warnings ;;
  esac
else
  ensure_debian
  export CARGO_TARGET_DIR=target/wasm-debian
  OUT=$CARGO_TARGET_DIR/$TARGET/release
  export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS="-L /usr/lib/wasm32-wasi $REMAP"
  case "$MODE" in
    build)
      /usr/bin/cargo build --release --target "$TARGET" -Zbuild-std=std,panic_abort "${PKG_ARGS[@]}" ;;
    clippy)
      # Debian's cargo-clippy must come first on PATH, not rustup's proxy.
      PATH=/usr/bin:$PATH /usr/bin/cargo clippy --release --target "$TARGET" \
        -Zbuild-std=std,panic_abort "${PKG_ARGS[@]}" -- -D warnings ;;
  esac
fi

if [ "$MODE" = build ]; then
  for p in "${PACKAGES[@]}"; do
    f=${p//-/_}.wasm
    cp "$OUT/$f" "build/$f.tmp" && mv "build/$f.tmp" "build/$f"
  done
  log "built with the $TOOLCHAIN toolchain: $(cd build && ls -s --block-size=K tollgate_*.wasm | tr '\n' ' ')"
fi
