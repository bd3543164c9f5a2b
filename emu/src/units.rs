//! Byte sizes and counts: parsing `--shard-size` values and printing sizes
//! (bytes through `humansize`).

use crate::error::CliError;

/// Parses a size such as `5GB`, `500MB`, `2GiB`, `9.5GB` or `1000` (bytes).
///
/// Decimal units (`kB`, `MB`, `GB`, `TB`) are powers of 1000 and binary ones
/// (`KiB`, `MiB`, `GiB`, `TiB`) powers of 1024, as in `transformers`'
/// `max_shard_size`. Case is ignored.
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let bad = || {
        CliError::InvalidValue(format!(
            "invalid size `{s}`: use a positive number with a unit, e.g. 5GB, 500MB, 2GiB or 1000000 (bytes)"
        ))
    };
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    let bytes = if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let b = v * mult as f64;
        if !b.is_finite() || b >= u64::MAX as f64 {
            return Err(bad());
        }
        b.round() as u64
    } else {
        num.parse::<u64>()
            .ok()
            .and_then(|v| v.checked_mul(mult))
            .ok_or_else(bad)?
    };
    if bytes == 0 {
        return Err(bad());
    }
    Ok(bytes)
}

/// A byte count in decimal units, as the Hugging Face hub shows file sizes
/// (`9.96 GB`, `148 GB`).
pub fn human_bytes(b: u64) -> String {
    humansize::format_size(b, humansize::DECIMAL)
}

/// A parameter count in short form (`37.0B`, `1.2M`, `345`).
pub fn human_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

/// An exact count with thousands separators (`37,000,000`).
pub fn grouped(n: u64) -> String {
    let s = n.to_string();
    let first = match s.len() % 3 {
        0 => 3,
        r => r,
    };
    let mut out = String::from(&s[..first]);
    for chunk in s.as_bytes()[first..].chunks(3) {
        out.push(',');
        out.push_str(std::str::from_utf8(chunk).expect("digits are ASCII"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("5gb").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("9.5GB").unwrap(), 9_500_000_000);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size(" 10 kB ").unwrap(), 10_000);
        for bad in ["", "GB", "0", "0GB", "5XB", "-5GB", "1.2.3GB", "99999999999999999999TB"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("e.g. 5GB"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_print() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(9_960_000_000), "9.96 GB");
        assert_eq!(human_bytes(148_000_000_000), "148 GB");
        assert_eq!(human_bytes(1_500), "1.50 kB");
        assert_eq!(grouped(37_000_123), "37,000,123");
        assert_eq!(grouped(12), "12");
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(123_456), "123,456");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(human_count(37_000_000_000), "37.00B");
        assert_eq!(human_count(1_234), "1.2K");
    }
}
