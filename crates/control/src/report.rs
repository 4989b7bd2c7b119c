//! An error and its causes on one line, as every engine's errors print
//! themselves for logs and progress reports.

/// `err` followed by each of its causes, each once: a cause whose text its
/// wrapper already ends with is not repeated.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        let line = err.to_string();
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    #[test]
    fn each_cause_is_said_once() {
        let inner = Layer {
            text: "no space left",
            source: None,
        };
        let middle = Layer {
            text: "cannot write /a: no space left",
            source: Some(Box::new(inner)),
        };
        let outer = Layer {
            text: "tier",
            source: Some(Box::new(middle)),
        };
        assert_eq!(report(&outer), "tier: cannot write /a: no space left");
    }
}
