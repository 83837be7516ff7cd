//! Verification of AWS Signature Version 4 on XKS proxy requests (service
//! `kms-xks-proxy`), as the XKS proxy API specification's Appendix A
//! describes: the canonical request over the method, path, query, the
//! headers the client signed and the SHA-256 of the body; the string to sign
//! with the request time and credential scope; the signing key derived from
//! the secret by date, region and service. The comparison is constant-time.

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// The service name XKS requests are signed for.
pub const SERVICE: &str = "kms-xks-proxy";

/// One access key id and its secret.
pub struct Credential {
    /// The access key id (in the Authorization header).
    pub access_key_id: String,
    /// The secret access key.
    pub secret: Zeroizing<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

/// Why a signature was refused; the message says which check failed,
/// never the expected signature.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

fn refused(message: impl Into<String>) -> Refused {
    Refused(message.into())
}

/// The parts of a request the signature covers.
pub struct Signed<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// The path as received (percent-encoded).
    pub path: &'a str,
    /// The query string, without `?`.
    pub query: &'a str,
    /// Header lookup by lower-case name: every value of the header.
    pub header: &'a (dyn Fn(&str) -> Vec<String> + Sync),
    /// The body.
    pub body: &'a [u8],
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length.
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn uri_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(k, false), uri_encode(v, false))
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// The fields of an `Authorization: AWS4-HMAC-SHA256 ...` header.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    terminator: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, Refused> {
    let rest = value
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| refused("the Authorization header is not AWS4-HMAC-SHA256"))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or_else(|| refused("malformed Authorization header"))?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => return Err(refused(format!("unexpected Authorization field {k:?}"))),
        }
    }
    let credential = credential.ok_or_else(|| refused("no Credential in the Authorization header"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = scope[..] else {
        return Err(refused("malformed credential scope"));
    };
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        terminator,
        signed_headers: signed.ok_or_else(|| refused("no SignedHeaders"))?.split(';').collect(),
        signature: signature.ok_or_else(|| refused("no Signature"))?,
    })
}

fn parse_amz_date(text: &str) -> Option<OffsetDateTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::PrimitiveDateTime::parse(text, &format).ok().map(|t| t.assume_utc())
}

/// Verifies `request` against `credentials`; returns the access key id
/// that signed it. `max_skew` bounds the request time's distance from now.
pub fn verify<'c>(
    request: &Signed<'_>,
    credentials: &'c [Credential],
    now: OffsetDateTime,
    max_skew: time::Duration,
) -> Result<&'c Credential, Refused> {
    verify_for(SERVICE, request, credentials, now, max_skew)
}

fn verify_for<'c>(
    service: &str,
    request: &Signed<'_>,
    credentials: &'c [Credential],
    now: OffsetDateTime,
    max_skew: time::Duration,
) -> Result<&'c Credential, Refused> {
    let authorization = (request.header)("authorization");
    let [authorization] = &authorization[..] else {
        return Err(refused("no (or more than one) Authorization header"));
    };
    let auth = parse_authorization(authorization)?;
    let credential = credentials
        .iter()
        .find(|c| c.access_key_id == auth.access_key_id)
        .ok_or_else(|| refused(format!("unknown access key id {:?}", auth.access_key_id)))?;
    if auth.service != service || auth.terminator != "aws4_request" {
        return Err(refused(format!("the credential scope is for service {:?}, not {service}", auth.service)));
    }
    for required in ["host", "x-amz-date"] {
        if !auth.signed_headers.contains(&required) {
            return Err(refused(format!("the {required} header is not signed")));
        }
    }
    let amz_date = (request.header)("x-amz-date");
    let [amz_date] = &amz_date[..] else { return Err(refused("no X-Amz-Date header")) };
    let when = parse_amz_date(amz_date).ok_or_else(|| refused("malformed X-Amz-Date"))?;
    if (now - when).abs() > max_skew {
        return Err(refused(format!(
            "the request time {amz_date} is more than {} s from the server's",
            max_skew.whole_seconds()
        )));
    }
    if !amz_date.starts_with(auth.date) || auth.date.len() != 8 {
        return Err(refused("the credential scope's date is not the request's"));
    }
    let mut canonical =
        format!("{}\n{}\n{}\n", request.method, uri_encode(request.path, true), canonical_query(request.query));
    for name in &auth.signed_headers {
        let values = (request.header)(name);
        if values.is_empty() {
            return Err(refused(format!("signed header {name:?} is missing")));
        }
        let joined: Vec<String> = values.iter().map(|v| v.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        canonical.push_str(&format!("{name}:{}\n", joined.join(",")));
    }
    canonical.push('\n');
    canonical.push_str(&auth.signed_headers.join(";"));
    canonical.push('\n');
    canonical.push_str(&hex::encode(Sha256::digest(request.body)));
    let scope = format!("{}/{}/{}/{}", auth.date, auth.region, auth.service, auth.terminator);
    let to_sign =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    let secret = Zeroizing::new(format!("AWS4{}", credential.secret.as_str()));
    let key = [auth.date, auth.region, auth.service, auth.terminator]
        .iter()
        .fold(Zeroizing::new(secret.as_bytes().to_vec()), |key, part| Zeroizing::new(hmac(&key, part.as_bytes())));
    let presented = hex::decode(auth.signature).map_err(|_| refused("the signature is not hex"))?;
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&key).map_err(|_| refused("bad signing key"))?;
    mac.update(to_sign.as_bytes());
    mac.verify_slice(&presented).map_err(|_| refused("the signature does not match"))?;
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of AWS's SigV4 documentation (GET IAM ListUsers
    /// with secret "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY") verifies with
    /// its published signature; any change to what is signed does not.
    #[test]
    fn the_documented_sigv4_example_verifies_and_tampering_does_not() {
        let headers = |name: &str| -> Vec<String> {
            match name {
                "authorization" => vec![
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
                     SignedHeaders=content-type;host;x-amz-date, \
                     Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
                        .to_owned(),
                ],
                "content-type" => vec!["application/x-www-form-urlencoded; charset=utf-8".to_owned()],
                "host" => vec!["iam.amazonaws.com".to_owned()],
                "x-amz-date" => vec!["20150830T123600Z".to_owned()],
                _ => vec![],
            }
        };
        let creds = [Credential {
            access_key_id: "AKIDEXAMPLE".into(),
            secret: Zeroizing::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
        }];
        let now = parse_amz_date("20150830T123700Z").unwrap();
        let request = Signed {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            header: &headers,
            body: b"",
        };
        let skew = time::Duration::minutes(5);
        assert_eq!(verify_for("iam", &request, &creds, now, skew).unwrap().access_key_id, "AKIDEXAMPLE");
        // Signed for iam, not for the XKS proxy.
        let err = verify(&request, &creds, now, skew).unwrap_err();
        assert!(err.0.contains("service \"iam\""), "{err:?}");
        // Another query, body, time or secret.
        let other = Signed { query: "Action=ListUsers&Version=2010-05-09", ..request };
        assert!(verify_for("iam", &other, &creds, now, skew).unwrap_err().0.contains("does not match"));
        let other = Signed { body: b"x", ..request };
        assert!(verify_for("iam", &other, &creds, now, skew).is_err());
        let late = parse_amz_date("20150830T130000Z").unwrap();
        assert!(verify_for("iam", &request, &creds, late, skew).unwrap_err().0.contains("more than 300 s"));
        let wrong = [Credential { access_key_id: "AKIDEXAMPLE".into(), secret: Zeroizing::new("nope".into()) }];
        assert!(verify_for("iam", &request, &wrong, now, skew).is_err());
        let unknown = [Credential { access_key_id: "OTHER".into(), secret: Zeroizing::new("x".into()) }];
        assert!(verify_for("iam", &request, &unknown, now, skew).unwrap_err().0.contains("unknown access key id"));
    }

    #[test]
    fn parses_and_rejects_authorization_headers() {
        assert!(parse_authorization("AWS4-HMAC-SHA256 Credential=A/20200101/r/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=ab").is_ok());
        assert!(parse_authorization("Basic abc").is_err());
        assert!(parse_authorization("AWS4-HMAC-SHA256 Credential=A/x, SignedHeaders=host, Signature=ab").is_err());
        assert_eq!(uri_encode("/a b/ü", true), "/a%20b/%C3%BC");
        assert_eq!(canonical_query("b=2&a=1"), "a=1&b=2");
    }
}
