//! How figures read in reasons and notes.

/// A share as a whole percentage: 0.925 -> "92%".
pub(crate) fn pct(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

/// Bytes in decimal megabytes: "310 MB".
pub(crate) fn mb(bytes: u64) -> String {
    format!("{} MB", (bytes as f64 / 1e6).round())
}

/// Cores with one decimal: "0.9 cores".
pub(crate) fn cores(cpu: f64) -> String {
    format!("{cpu:.1} cores")
}

/// Seconds, whole: "6 s".
pub(crate) fn secs(s: f64) -> String {
    format!("{s:.0} s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(pct(0.92), "92%");
        assert_eq!(pct(1.5), "150%");
        assert_eq!(mb(310_400_000), "310 MB");
        assert_eq!(cores(0.94), "0.9 cores");
        assert_eq!(secs(6.4), "6 s");
    }
}
