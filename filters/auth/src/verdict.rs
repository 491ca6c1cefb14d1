//! The JWT path's decisions as pure functions of what the filter has read: which provider a
//! token names, whether its keys are ready, what an unknown `kid` leads to. The filter applies
//! them (`filter.rs`: waits, metrics, the answer); these functions never touch the host.

use std::rc::Rc;

use serde_json::{Map, Value};

use crate::config::Provider;
use crate::jose::{self, Jwk, Jws, JwsError, StrictValue};
use crate::keyset::RemoteState;

/// How far a JWT's check has gone: a request waits at most once for a provider's first keys
/// and once for a refetch its unknown `kid` asked for (or one under way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Not waited yet.
    First,
    /// After waiting for the provider's keys (there were none).
    AfterKeys,
    /// After waiting for a fetch that may bring an unknown `kid`.
    AfterRefetch,
}

/// A refused credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Reason (metric name, `reason` of the answer).
    pub reason: &'static str,
    /// Safe to send to the client.
    pub detail: String,
    /// Scheme of `WWW-Authenticate` (`Bearer` or `ApiKey`).
    pub scheme: &'static str,
}

impl Refusal {
    /// A refused bearer token.
    pub fn token(reason: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            reason,
            detail: detail.into(),
            scheme: "Bearer",
        }
    }
}

impl From<JwsError> for Refusal {
    fn from(e: JwsError) -> Self {
        Refusal::token(e.reason(), e.to_string())
    }
}

impl From<crate::claims::ClaimError> for Refusal {
    fn from(e: crate::claims::ClaimError) -> Self {
        Refusal::token(e.reason(), e.to_string())
    }
}

/// A token read far enough to choose its provider; its signature is not checked yet.
#[derive(Debug)]
pub struct Read<'t> {
    /// The parsed JWS.
    pub jws: Jws<'t>,
    /// Its claims.
    pub claims: Map<String, Value>,
    /// Index of the provider its `iss` names (accepted on the route, `alg` allowed).
    pub provider: usize,
}

/// Parse a token and choose its provider among `providers`; `allowed`: the route's.
pub fn read_token<'t>(
    token: &'t str,
    providers: &[Provider],
    allowed: &[usize],
) -> Result<Read<'t>, Refusal> {
    let jws = jose::parse_compact(token)?;
    let claims = match serde_json::from_slice::<StrictValue>(&jws.payload) {
        Ok(StrictValue(Value::Object(m))) => m,
        _ => {
            return Err(Refusal::token(
                "malformed",
                "the token's payload is not a JSON object without duplicate members",
            ))
        }
    };
    let Some(iss) = claims.get("iss").and_then(Value::as_str) else {
        return Err(Refusal::token(
            "unknown_issuer",
            "the token has no issuer (`iss`)",
        ));
    };
    let Some((provider, p)) = providers.iter().enumerate().find(|(_, p)| p.issuer == iss) else {
        return Err(Refusal::token(
            "unknown_issuer",
            "the token's issuer is not known",
        ));
    };
    if !allowed.contains(&provider) {
        return Err(Refusal::token(
            "issuer_not_allowed",
            "the token's issuer is not accepted on this route",
        ));
    }
    if !p.algorithms.contains(&jws.header.alg) {
        return Err(JwsError::AlgNotAllowed(jws.header.alg.name().into()).into());
    }
    Ok(Read {
        jws,
        claims,
        provider,
    })
}

/// What a worker knows of a remote provider's keys at one moment.
#[derive(Debug, Clone, Default)]
pub struct KeyView {
    /// Keys usable now.
    pub keys: Option<Rc<Vec<Jwk>>>,
    /// This worker fetches now.
    pub fetching_here: bool,
    /// The last fetch failed and the retry interval has not passed.
    pub failed_recently: bool,
    /// The last fetch (this worker's or another's) failed: the key server is down.
    pub down: bool,
}

impl KeyView {
    /// The view of a provider's state at `now`.
    pub fn of(st: &RemoteState, now: f64) -> KeyView {
        let failed = st.failed_at > 0.0 && st.fetching.is_none();
        KeyView {
            keys: st.current(now),
            fetching_here: st.fetching.is_some(),
            failed_recently: failed && now < st.next_attempt,
            down: failed,
        }
    }
}

/// What to do for a token of a remote provider, before verifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStep {
    /// Verify with these keys.
    Verify,
    /// Wait for keys (`fetch`: ask for a fetch), then check again as `then`.
    Wait {
        /// Ask the root for a fetch.
        fetch: bool,
        /// The attempt after the wait.
        then: Attempt,
    },
    /// The failure mode.
    Unavailable,
}

/// Keys ready, or wait once for the first keys, or the failure mode.
pub fn key_step(view: &KeyView, attempt: Attempt) -> KeyStep {
    match &view.keys {
        Some(_) => KeyStep::Verify,
        None if attempt != Attempt::First || view.failed_recently => KeyStep::Unavailable,
        None => KeyStep::Wait {
            fetch: true,
            then: Attempt::AfterKeys,
        },
    }
}

/// What an unknown `kid` leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KidStep {
    /// The key server is down: the key may simply be new, so the failure mode (and a fetch
    /// asked for after the retry interval, without waiting).
    Unavailable,
    /// Wait for the fetch under way (here or in another worker).
    WaitForFetch,
    /// Claim a refetch (one per `refetch_interval` for all workers); refused if not granted.
    TryRefetch,
    /// Refused: `unknown_kid`.
    Refuse,
}

/// The decision for an unknown `kid`; `fetching_elsewhere`: does another worker hold the
/// fetch lease now (asked only when it matters: a shared-data read).
pub fn unknown_kid_step(
    view: &KeyView,
    attempt: Attempt,
    fetching_elsewhere: impl FnOnce() -> bool,
) -> KidStep {
    if view.down {
        KidStep::Unavailable
    } else if attempt == Attempt::AfterRefetch {
        KidStep::Refuse
    } else if view.fetching_here || fetching_elsewhere() {
        KidStep::WaitForFetch
    } else {
        KidStep::TryRefetch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(keys: bool, fetching_here: bool, failed_recently: bool, down: bool) -> KeyView {
        KeyView {
            keys: keys.then(|| Rc::new(Vec::new())),
            fetching_here,
            failed_recently,
            down,
        }
    }

    #[test]
    fn key_steps() {
        use Attempt::*;
        let wait = KeyStep::Wait {
            fetch: true,
            then: AfterKeys,
        };
        let table = [
            (view(true, false, false, false), First, KeyStep::Verify),
            (view(true, false, true, true), AfterRefetch, KeyStep::Verify),
            (view(false, false, false, false), First, wait.clone()),
            (view(false, true, false, false), First, wait),
            (view(false, false, true, true), First, KeyStep::Unavailable),
            (
                view(false, false, false, false),
                AfterKeys,
                KeyStep::Unavailable,
            ),
        ];
        for (v, a, want) in table {
            assert_eq!(key_step(&v, a), want, "{v:?} {a:?}");
        }
    }

    #[test]
    fn unknown_kid_steps() {
        use Attempt::*;
        use KidStep::*;
        let table = [
            // (keys, here, recently, down), attempt, elsewhere -> step
            (view(true, false, false, true), First, false, Unavailable),
            (
                view(true, false, false, true),
                AfterRefetch,
                true,
                Unavailable,
            ),
            (view(true, false, false, false), AfterRefetch, true, Refuse),
            (view(true, true, false, false), First, false, WaitForFetch),
            (
                view(true, false, false, false),
                AfterKeys,
                true,
                WaitForFetch,
            ),
            (view(true, false, false, false), First, false, TryRefetch),
            (
                view(true, false, false, false),
                AfterKeys,
                false,
                TryRefetch,
            ),
        ];
        for (v, a, elsewhere, want) in table {
            assert_eq!(
                unknown_kid_step(&v, a, || elsewhere),
                want,
                "{v:?} {a:?} {elsewhere}"
            );
        }
    }

    #[test]
    fn a_state_seen_at_a_moment() {
        let mut st = RemoteState {
            keys: Some(Rc::new(Vec::new())),
            expires_at: 100.0,
            failed_at: 50.0,
            next_attempt: 51.0,
            ..RemoteState::default()
        };
        let v = KeyView::of(&st, 50.5);
        assert!(v.keys.is_some() && v.failed_recently && v.down && !v.fetching_here);
        let v = KeyView::of(&st, 100.0);
        assert!(v.keys.is_none() && !v.failed_recently && v.down);
        st.fetching = Some(crate::keyset::Fetch {
            token: 1,
            stage: crate::keyset::Stage::Jwks,
            started: 50.6,
        });
        let v = KeyView::of(&st, 50.7);
        assert!(v.fetching_here && !v.down && !v.failed_recently);
    }
}
