//! Identifier rules. Workflow IDs and type names become subject tokens and redb keys, so
//! they are held to a fixed character set and length.

/// Longest workflow ID accepted.
pub const MAX_WORKFLOW_ID_LEN: usize = 255;
/// Longest workflow type, activity or queue name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId(pub String);

impl std::fmt::Display for InvalidId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidId {}

/// Checks a workflow ID: 1 to 255 characters from letters, digits and `-_:@`.
pub fn validate_workflow_id(id: &str) -> Result<(), InvalidId> {
    if id.is_empty() {
        return Err(InvalidId("workflow_id is empty".into()));
    }
    if id.len() > MAX_WORKFLOW_ID_LEN {
        return Err(InvalidId(format!(
            "workflow_id is {} characters long; at most {MAX_WORKFLOW_ID_LEN} allowed",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '@')))
    {
        return Err(InvalidId(format!(
            "workflow_id contains {c:?}; only letters, digits and -_:@ are allowed"
        )));
    }
    Ok(())
}

/// Checks a workflow type, activity or queue name: 1 to 64 characters from letters, digits,
/// `-` and `_`.
pub fn validate_name(kind: &str, name: &str) -> Result<(), InvalidId> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(InvalidId(format!(
            "{kind} must be 1 to {MAX_NAME_LEN} characters long"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        return Err(InvalidId(format!(
            "{kind} contains {c:?}; only letters, digits, - and _ are allowed"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_character_set() {
        assert!(validate_workflow_id("infer-1:user@team_A").is_ok());
        assert!(validate_workflow_id(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn refuses_subject_wildcards_and_separators() {
        for bad in ["", "a.b", "a*", "a>", "a b", "é", "a/b"] {
            assert!(validate_workflow_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_workflow_id(&"a".repeat(256)).is_err());
    }

    #[test]
    fn names_are_stricter_than_ids() {
        assert!(validate_name("queue", "gpu").is_ok());
        assert!(validate_name("queue", "g:pu").is_err());
        assert!(validate_name("queue", "").is_err());
    }
}
