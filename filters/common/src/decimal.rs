//! Decimal digits without the formatting machinery (`format!`/`to_string` cost far more in a
//! wasm module, and shared-data keys and response fields are written on every request).

/// Append the decimal digits of `v` to `out`.
pub fn push_u64(out: &mut String, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || at == 0 {
            break;
        }
    }
    for d in digits.get(at..).unwrap_or(&[]) {
        out.push(char::from(*d));
    }
}

#[cfg(test)]
mod tests {
    use super::push_u64;

    #[test]
    fn digits_are_the_formatted_ones() {
        for v in [0, 1, 9, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            let mut s = String::from("k.");
            push_u64(&mut s, v);
            assert_eq!(s, format!("k.{v}"));
        }
    }
}
