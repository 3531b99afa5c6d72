//! Diagnostics: what Terraform shows the user when something is wrong, pinned to the
//! attribute at fault so Terraform can print the offending line of configuration.

use crate::proto::tfplugin6 as pb;

/// One step of an attribute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Attr(String),
    Index(i64),
}

/// An error or warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diag {
    pub error: bool,
    pub summary: String,
    pub detail: String,
    pub path: Vec<Step>,
}

/// What an operation answers when it fails: every problem found, not just the first.
pub type Diags = Vec<Diag>;

impl Diag {
    pub fn error(summary: impl Into<String>, detail: impl Into<String>) -> Diag {
        Diag {
            error: true,
            summary: summary.into(),
            detail: detail.into(),
            path: Vec::new(),
        }
    }

    pub fn warning(summary: impl Into<String>, detail: impl Into<String>) -> Diag {
        Diag {
            error: false,
            ..Diag::error(summary, detail)
        }
    }

    /// Pins the diagnostic to a top-level attribute.
    pub fn at(mut self, attr: &str) -> Diag {
        self.path = vec![Step::Attr(attr.to_string())];
        self
    }

    /// Pins the diagnostic to `block[index].attr`.
    pub fn at_nested(mut self, block: &str, index: usize, attr: &str) -> Diag {
        self.path = vec![
            Step::Attr(block.to_string()),
            Step::Index(i64::try_from(index).unwrap_or(i64::MAX)),
            Step::Attr(attr.to_string()),
        ];
        self
    }

    /// The path as users read it: `priority[1].clusters`.
    pub fn path_string(&self) -> String {
        let mut out = String::new();
        for step in &self.path {
            match step {
                Step::Attr(a) if out.is_empty() => out.push_str(a),
                Step::Attr(a) => {
                    out.push('.');
                    out.push_str(a);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    pub fn to_proto(&self) -> pb::Diagnostic {
        use pb::diagnostic::Severity;
        pb::Diagnostic {
            severity: if self.error {
                Severity::Error
            } else {
                Severity::Warning
            } as i32,
            summary: self.summary.clone(),
            detail: self.detail.clone(),
            attribute: (!self.path.is_empty()).then(|| path_proto(&self.path)),
        }
    }
}

/// An attribute path in the protocol's form.
pub fn path_proto(path: &[Step]) -> pb::AttributePath {
    use pb::path_step::Selector;
    pb::AttributePath {
        steps: path
            .iter()
            .map(|s| pb::PathStep {
                selector: Some(match s {
                    Step::Attr(a) => Selector::AttributeName(a.clone()),
                    Step::Index(i) => Selector::ElementKeyInt(*i),
                }),
            })
            .collect(),
    }
}

/// The path of a top-level attribute, e.g. for `requires_replace`.
pub fn attr_path(name: &str) -> pb::AttributePath {
    path_proto(&[Step::Attr(name.to_string())])
}

/// The diagnostics in the protocol's form.
pub fn to_proto(diags: &[Diag]) -> Vec<pb::Diagnostic> {
    diags.iter().map(Diag::to_proto).collect()
}
