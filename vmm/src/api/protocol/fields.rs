//! The fields of one request object as the server reads them: a serde visitor that keeps the
//! `id` as the raw JSON text the client sent (echoed byte for byte: ids beyond 64 bits, strings,
//! objects) and notes a key given twice, which serde_json would otherwise resolve silently by
//! keeping the last (`{"cmd":"stats","cmd":"shutdown"}` must not shut the VM down).

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// A request object's members, in order, with its raw `id` apart.
#[derive(Debug, Default)]
pub struct RequestFields {
    /// The `id` exactly as sent.
    pub id: Option<Box<RawValue>>,
    /// Every other member, in the order sent.
    pub members: Vec<(String, Value)>,
    /// The first key that appeared more than once.
    pub duplicate: Option<String>,
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = RequestFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestFields, A::Error> {
        let mut fields = RequestFields::default();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) && fields.duplicate.is_none() {
                fields.duplicate = Some(key.clone());
            }
            if key == "id" {
                let raw = map.next_value::<Box<RawValue>>()?;
                fields.id.get_or_insert(raw);
            } else {
                let value = map.next_value::<Value>()?;
                fields.members.push((key, value));
            }
        }
        Ok(fields)
    }
}

impl<'de> Deserialize<'de> for RequestFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_id_and_duplicates() {
        let f: RequestFields =
            serde_json::from_str(r#"{"id": 123456789012345678901234567890, "cmd":"a","cmd":"b"}"#)
                .unwrap();
        assert_eq!(f.id.unwrap().get(), "123456789012345678901234567890");
        assert_eq!(f.duplicate.as_deref(), Some("cmd"));
        assert_eq!(f.members.len(), 2);
        let f: RequestFields = serde_json::from_str(r#"{"cmd":"a","id":{"x":[1, 2]}}"#).unwrap();
        assert_eq!(f.id.unwrap().get(), r#"{"x":[1, 2]}"#);
        assert!(f.duplicate.is_none());
    }
}
