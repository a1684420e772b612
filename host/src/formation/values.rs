//! Value types of the formation file that accept a human form: sizes
//! (`"64MiB"` or a number of bytes), durations (`"10s"`, `"1m 30s"`) and
//! cores (`0.5`, `2`).
//! A bad value fails inside the deserializer, so its error carries the
//! value's line and column.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// A number of bytes, written `"64MiB"`, `"512KiB"`, `"1GB"` or as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// The shortest exact form: `64KiB`, `4GiB`, `1 byte`, `1000 bytes`; the
/// form error messages state bounds in.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n != 0 && n.trailing_zeros() >= shift {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        match n {
            1 => f.write_str("1 byte"),
            n => write!(f, "{n} bytes"),
        }
    }
}

impl<'de> de::Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64MiB\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| {
                    E::custom(format!(
                        "invalid size {v}: expected a positive number of bytes"
                    ))
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|s| ByteSize(s.as_u64()))
                    .map_err(|_| {
                        E::custom(format!(
                            "invalid size `{v}`: expected a number and a unit such as \"64MiB\", \"512KiB\" or \"1GB\""
                        ))
                    })
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration, written `"10s"`, `"250ms"`, `"1m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> de::Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"10s\" or \"250ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(v.trim())
                    .map(HumanDuration)
                    .map_err(|_| {
                        E::custom(format!(
                            "invalid duration `{v}`: expected a number and a unit such as \"10s\", \"250ms\" or \"2m\""
                        ))
                    })
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// A number of cores, written `0.5` or `2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cores(pub f64);

impl<'de> de::Deserialize<'de> for Cores {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CoresVisitor;
        impl Visitor<'_> for CoresVisitor {
            type Value = Cores;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of cores such as 0.5 or 2")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cores, E> {
                Ok(Cores(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cores, E> {
                Ok(Cores(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cores, E> {
                Ok(Cores(v as f64))
            }
        }
        deserializer.deserialize_any(CoresVisitor)
    }
}

/// `scale = 8` or `scale = { min = 1, max = 16, cooldown = "30s" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleSpec {
    /// A fixed number of instances.
    Fixed(u64),
    /// Autoscaling between bounds.
    Range {
        /// Fewest instances.
        min: u64,
        /// Most instances.
        max: u64,
        /// How long load must stay low before scaling down.
        cooldown: Option<Duration>,
    },
}

impl<'de> de::Deserialize<'de> for ScaleSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScaleVisitor;
        impl<'de> Visitor<'de> for ScaleVisitor {
            type Value = ScaleSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of instances, or { min = N, max = M } to autoscale")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScaleSpec, E> {
                Ok(ScaleSpec::Fixed(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScaleSpec, E> {
                u64::try_from(v)
                    .map(ScaleSpec::Fixed)
                    .map_err(|_| E::custom(format!("`scale` is {v}: expected a positive number")))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<ScaleSpec, A::Error> {
                let (mut min, mut max, mut cooldown) = (None, None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "min" => min = Some(map.next_value::<u64>()?),
                        "max" => max = Some(map.next_value::<u64>()?),
                        "cooldown" => cooldown = Some(map.next_value::<HumanDuration>()?.0),
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["min", "max", "cooldown"],
                            ));
                        }
                    }
                }
                match (min, max) {
                    (Some(min), Some(max)) => Ok(ScaleSpec::Range { min, max, cooldown }),
                    _ => Err(de::Error::custom(
                        "`scale = { … }` needs both `min` and `max`",
                    )),
                }
            }
        }
        deserializer.deserialize_any(ScaleVisitor)
    }
}

/// A value whose own errors (a bad size, a bad duration) are kept instead
/// of stopping the deserializer, so one pass can report every bad value of
/// a table. The type of the TOML value must still be right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lenient<T>(pub Result<T, String>);

impl<'de, T: de::DeserializeOwned> de::Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(deserializer)?;
        Ok(Lenient(
            T::deserialize(value).map_err(|e| e.message().to_string()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Doc {
        size: ByteSize,
        time: HumanDuration,
    }

    #[test]
    fn sizes_and_durations_accept_human_forms() {
        let doc: Doc = toml::from_str("size = \"64MiB\"\ntime = \"1m 30s\"").unwrap();
        assert_eq!(doc.size, ByteSize(64 << 20));
        assert_eq!(doc.time, HumanDuration(Duration::from_secs(90)));
        let doc: Doc = toml::from_str("size = 4096\ntime = \"250ms\"").unwrap();
        assert_eq!(doc.size, ByteSize(4096));
        assert_eq!(doc.time, HumanDuration(Duration::from_millis(250)));
    }

    #[test]
    fn sizes_print_in_their_shortest_exact_unit() {
        let shown = |n: u64| ByteSize(n).to_string();
        assert_eq!(shown(64 << 10), "64KiB");
        assert_eq!(shown(4 << 30), "4GiB");
        assert_eq!(shown(1536 << 20), "1536MiB");
        assert_eq!(shown(1), "1 byte");
        assert_eq!(shown(1000), "1000 bytes");
        assert_eq!(shown(0), "0 bytes");
    }

    #[test]
    fn bad_sizes_say_what_was_expected() {
        let err = toml::from_str::<Doc>("size = \"lots\"\ntime = \"1s\"")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("invalid size `lots`"), "{err}");
    }
}
