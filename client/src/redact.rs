//! Debug for the generated messages that carry a plaintext DEK (the codegen
//! skips their derived Debug): every field but the plaintext is shown, and
//! the plaintext only by its length, so `{:?}` of a request or response, or
//! of a batch holding them, never prints key bytes.

use std::fmt;

use crate::pb::{GenerateDataKeyResponse, UnwrapResponse, WrapRequest};

/// Shows a secret by its length only.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0)
    }
}

impl fmt::Debug for WrapRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrapRequest")
            .field("key", &self.key)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("context", &self.context)
            .finish()
    }
}

impl fmt::Debug for UnwrapResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnwrapResponse")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("key", &self.key)
            .field("version", &self.version)
            .field("rewrap_advised", &self.rewrap_advised)
            .finish()
    }
}

impl fmt::Debug for GenerateDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateDataKeyResponse")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("ciphertext", &self.ciphertext)
            .field("key", &self.key)
            .field("version", &self.version)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::pb;

    #[test]
    fn messages_that_carry_a_plaintext_never_debug_print_it() {
        let secret = b"0123456789abcdef-very-secret-dek".to_vec();
        let shown = [
            format!("{:?}", pb::WrapRequest { key: "k".into(), plaintext: secret.clone(), ..Default::default() }),
            format!("{:?}", pb::UnwrapResponse { plaintext: secret.clone(), key: "k".into(), ..Default::default() }),
            format!(
                "{:?}",
                pb::GenerateDataKeyResponse { plaintext: secret.clone(), key: "k".into(), ..Default::default() }
            ),
            format!(
                "{:?}",
                pb::BatchWrapRequest {
                    items: vec![pb::WrapRequest { key: "k".into(), plaintext: secret.clone(), ..Default::default() }]
                }
            ),
            format!(
                "{:?}",
                pb::BatchUnwrapResponse {
                    results: vec![pb::BatchUnwrapResult {
                        result: Some(pb::batch_unwrap_result::Result::Ok(pb::UnwrapResponse {
                            plaintext: secret.clone(),
                            ..Default::default()
                        })),
                    }]
                }
            ),
        ];
        // prost's derived Debug prints bytes as a list of numbers.
        let as_numbers = format!("{:?}", secret);
        for text in &shown {
            assert!(text.contains("<redacted 32 bytes>"), "{text}");
            assert!(!text.contains(&as_numbers[1..20]), "plaintext printed: {text}");
        }
    }
}
