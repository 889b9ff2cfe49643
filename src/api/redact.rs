//! Server paths kept out of what clients see of an error: the status message and the
//! rich status (google.rpc.Status, which repeats the message, and its ErrorInfo and
//! BadRequest details), which gRPC clients such as grpcurl, grpc-go and C#'s
//! `GetRpcStatus()` read instead of the message header.

use prost::Message;
use tonic::Status;
use tonic_types::pb;

/// Server paths in statuses, replaced by what clients know them by: a path under a model
/// root by the path under the root (`sdxl/unet/config.json`), the default model's by its
/// name. Full paths stay in the server's log.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// (prefix, replacement), longest prefix first.
    prefixes: Vec<(String, String)>,
}

impl Redactor {
    /// Redacts the model `roots` and the default model's own path (by its `name`).
    pub fn new(roots: &[std::path::PathBuf], default: (&std::path::Path, &str)) -> Self {
        let mut prefixes = Vec::new();
        let forms = |path: &std::path::Path| {
            let mut forms = vec![path.to_string_lossy().into_owned()];
            if let Ok(real) = path.canonicalize() {
                forms.push(real.to_string_lossy().into_owned());
            }
            forms
        };
        for root in roots {
            for form in forms(root) {
                prefixes.push((format!("{}/", form.trim_end_matches('/')), String::new()));
            }
        }
        for form in forms(default.0) {
            prefixes.push((
                form.trim_end_matches('/').to_string(),
                default.1.to_string(),
            ));
        }
        prefixes.retain(|(p, _)| p.len() > 1);
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Self { prefixes }
    }

    /// `status` with every known server path in its message and details replaced.
    pub fn apply(&self, status: Status) -> Status {
        let leaks = |text: &str| self.prefixes.iter().any(|(p, _)| text.contains(p.as_str()));
        if !leaks(status.message()) && !leaks(&String::from_utf8_lossy(status.details())) {
            return status;
        }
        let message = self.text(status.message());
        // Details that do not decode as a rich status are dropped rather than passed on.
        let details = self.details(status.details(), &message).unwrap_or_default();
        Status::with_details(status.code(), message, details.into())
    }

    fn text(&self, text: &str) -> String {
        let mut redacted = text.to_string();
        for (prefix, replacement) in &self.prefixes {
            redacted = redacted.replace(prefix.as_str(), replacement);
        }
        redacted
    }

    /// The rich status in `bytes` with `message` and its details' texts redacted.
    fn details(&self, bytes: &[u8], message: &str) -> Option<Vec<u8>> {
        if bytes.is_empty() {
            return Some(Vec::new());
        }
        let mut rich = pb::Status::decode(bytes).ok()?;
        rich.message = message.to_string();
        for any in &mut rich.details {
            if any.type_url.ends_with("/google.rpc.ErrorInfo") {
                let mut info = pb::ErrorInfo::decode(any.value.as_slice()).ok()?;
                for value in info.metadata.values_mut() {
                    *value = self.text(value);
                }
                any.value = info.encode_to_vec();
            } else if any.type_url.ends_with("/google.rpc.BadRequest") {
                let mut bad = pb::BadRequest::decode(any.value.as_slice()).ok()?;
                for violation in &mut bad.field_violations {
                    violation.description = self.text(&violation.description);
                }
                any.value = bad.encode_to_vec();
            }
        }
        Some(rich.encode_to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

    fn redactor() -> Redactor {
        let roots = [std::path::PathBuf::from("/srv/models/lora")];
        Redactor::new(&roots, (std::path::Path::new("/opt/demo"), "demo"))
    }

    #[test]
    fn the_rich_status_loses_server_paths_with_the_message() {
        let message = "bad weight file `/srv/models/lora/a/b.safetensors` beside /opt/demo/unet";
        let mut details = ErrorDetails::with_error_info(
            "WEIGHT_FILE",
            "sdxld",
            [(
                "file".to_string(),
                "/srv/models/lora/a/b.safetensors".to_string(),
            )],
        );
        details.set_bad_request(vec![FieldViolation::new(
            "spec.loras[0].name",
            "reads /srv/models/lora/a/b.safetensors",
        )]);
        let status = Status::with_error_details(Code::FailedPrecondition, message, details);
        let redacted = redactor().apply(status);
        let expected = "bad weight file `a/b.safetensors` beside demo/unet";
        assert_eq!(redacted.message(), expected);
        let rich = pb::Status::decode(redacted.details()).expect("a rich status");
        assert_eq!((rich.code, rich.message.as_str()), (9, expected));
        let info = redacted.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.metadata["file"], "a/b.safetensors");
        let bad = redacted.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].description, "reads a/b.safetensors");
    }

    #[test]
    fn statuses_without_server_paths_pass_unchanged() {
        let status = Status::with_error_details(
            Code::NotFound,
            "model `x` not found",
            ErrorDetails::with_error_info(
                "MODEL_NOT_FOUND",
                "sdxld",
                [("model".to_string(), "x".to_string())],
            ),
        );
        let details = status.details().to_vec();
        let same = redactor().apply(status);
        assert_eq!(same.message(), "model `x` not found");
        assert_eq!(same.details(), details.as_slice());
    }
}
