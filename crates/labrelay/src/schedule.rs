//! Rest hours: hours of the day during which a tool starts no new work (for example
//! while the LIMS database runs its nightly backup). Work already started finishes.

use std::fmt;

/// A set of hours 0–23, parsed from `"0-6,22,23"`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct RestHours(u32);

impl RestHours {
    /// Parse a comma-separated list of hours and inclusive ranges. A range may wrap
    /// midnight (`22-5`).
    pub fn parse(text: &str) -> Result<RestHours, String> {
        let mut bits = 0u32;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let hour = |s: &str| -> Result<u32, String> {
                let h: u32 = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{s}` is not an hour (0-23) in `{text}`"))?;
                if h > 23 {
                    return Err(format!("hour {h} is out of range 0-23 in `{text}`"));
                }
                Ok(h)
            };
            if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (hour(a)?, hour(b)?);
                let mut h = a;
                loop {
                    bits |= 1 << h;
                    if h == b {
                        break;
                    }
                    h = (h + 1) % 24;
                }
            } else {
                bits |= 1 << hour(part)?;
            }
        }
        Ok(RestHours(bits))
    }

    /// Whether `hour` (0–23) is a rest hour.
    pub fn contains(self, hour: u32) -> bool {
        hour < 24 && self.0 & (1 << hour) != 0
    }

    /// Whether now (local time) is a rest hour.
    pub fn is_resting_now(self) -> bool {
        use chrono::Timelike;
        self.contains(chrono::Local::now().hour())
    }

    /// No rest hours at all.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for RestHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hours: Vec<u32> = (0..24).filter(|h| self.contains(*h)).collect();
        write!(f, "RestHours({hours:?})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_ranges_and_wrapping() {
        let r = RestHours::parse("0-2, 5 ,22-23").unwrap();
        for h in [0, 1, 2, 5, 22, 23] {
            assert!(r.contains(h), "{h}");
        }
        for h in [3, 4, 6, 21] {
            assert!(!r.contains(h), "{h}");
        }
        let w = RestHours::parse("22-1").unwrap();
        assert!(w.contains(23) && w.contains(0) && w.contains(1) && !w.contains(2));
        assert!(RestHours::parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_hours_are_named() {
        assert!(RestHours::parse("24").unwrap_err().contains("24"));
        assert!(RestHours::parse("x-3").unwrap_err().contains("`x`"));
    }
}
