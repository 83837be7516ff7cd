//! `keybroker.v1.KeyBroker`: Wrap, Unwrap, GenerateDataKey, Rewrap and their
//! batch forms. Every call, and every batch item, is authorized against the
//! policy for the key it touches (for Unwrap and Rewrap, the key named in
//! the ciphertext's header) and recorded in the audit log.

use std::sync::Arc;

use keybroker_client::pb;
use keybroker_client::pb::key_broker_server::KeyBroker;
use tonic::{Request, Response, Status};

use super::{Call, Guards, Touched, item_error};
use crate::backend::WrapItem;
use crate::core::broker::Broker;
use crate::core::envelope;
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::security::audit::code_name;
use crate::security::policy::Rpc;

/// The data-plane service.
pub struct KeyBrokerService {
    broker: Arc<Broker>,
    guards: Guards,
}

type Groups = super::BatchGroups;

fn tally<T>(groups: &mut Groups, touched: Touched, result: &ServiceResult<T>) {
    let code = result.as_ref().err().map(ServiceError::code);
    let entry = groups.entry((touched.key, touched.version, touched.backend, code_name(code))).or_insert((0, code));
    entry.0 += 1;
}

/// The key and version a ciphertext's header names, if it parses.
fn header_of(ciphertext: &[u8]) -> Option<(String, u32)> {
    envelope::parse(ciphertext).ok().map(|e| (e.key.to_owned(), e.version))
}

impl KeyBrokerService {
    /// A service over `broker`, behind `guards`.
    pub fn new(broker: Arc<Broker>, guards: Guards) -> Self {
        Self { broker, guards }
    }

    fn check_batch(&self, call: &Call<'_>, len: usize) -> ServiceResult<()> {
        let max = self.broker.limits().max_batch_items;
        if len > max {
            return Err(ServiceError::invalid(format!(
                "batch has {len} items; the limit is {max} (limits.max_batch_items)"
            )));
        }
        // The call itself was charged one by the limit layer.
        self.guards.limits.charge(call.identity(), len.saturating_sub(1))
    }

    async fn wrap_one(&self, call: &Call<'_>, req: &pb::WrapRequest) -> (ServiceResult<pb::WrapResponse>, Touched) {
        let mut touched = Touched { context_sha256: call.context_hash(&req.context), ..Touched::key(&req.key) };
        let result = match call.allow(Rpc::Wrap, &req.key) {
            Ok(()) => self.broker.wrap(&req.key, &req.plaintext, &req.context).await,
            Err(err) => Err(err),
        };
        let result = result.map(|w| {
            touched.version = w.version;
            touched.backend = w.backend;
            pb::WrapResponse { ciphertext: w.ciphertext, key: w.key, version: w.version }
        });
        (result, touched)
    }

    async fn unwrap_one(
        &self,
        call: &Call<'_>,
        req: &pb::UnwrapRequest,
    ) -> (ServiceResult<pb::UnwrapResponse>, Touched) {
        let mut touched = Touched { context_sha256: call.context_hash(&req.context), ..Touched::default() };
        let allowed = match header_of(&req.ciphertext) {
            Some((key, version)) => {
                let allowed = call.allow(Rpc::Unwrap, &key);
                (touched.key, touched.version) = (key, version);
                allowed
            }
            // Malformed: the broker says how, to a caller that may unwrap.
            None => call.allow_somewhere(Rpc::Unwrap),
        };
        let result = match allowed {
            Ok(()) => self.broker.unwrap(&req.ciphertext, &req.context).await,
            Err(err) => Err(err),
        };
        let result = result.map(|u| {
            touched.backend = u.backend;
            pb::UnwrapResponse {
                plaintext: u.plaintext.to_vec(),
                key: u.key,
                version: u.version,
                rewrap_advised: u.rewrap_advised,
            }
        });
        (result, touched)
    }

    /// Rewrap under the same key needs Rewrap on it; into another key,
    /// Unwrap on the source and Wrap on the target.
    fn allow_rewrap(call: &Call<'_>, source: Option<&str>, target: &str) -> ServiceResult<()> {
        match source {
            None => call.allow_somewhere(Rpc::Rewrap),
            Some(source) if target.is_empty() || target == source => call.allow(Rpc::Rewrap, source),
            Some(source) => {
                call.allow(Rpc::Unwrap, source)?;
                call.allow(Rpc::Wrap, target)
            }
        }
    }

    async fn rewrap_one(
        &self,
        call: &Call<'_>,
        req: &pb::RewrapRequest,
    ) -> (ServiceResult<pb::RewrapResponse>, Touched) {
        let mut touched = Touched { context_sha256: call.context_hash(&req.context), ..Touched::default() };
        let source = header_of(&req.ciphertext);
        if let Some((key, version)) = &source {
            (touched.key, touched.version) = (key.clone(), *version);
        }
        let result = match Self::allow_rewrap(call, source.as_ref().map(|(k, _)| k.as_str()), &req.target_key) {
            Ok(()) => self.broker.rewrap(&req.ciphertext, &req.context, &req.target_key).await,
            Err(err) => Err(err),
        };
        let result = result.map(|w| {
            (touched.key, touched.version, touched.backend) = (w.key.clone(), w.version, w.backend);
            pb::RewrapResponse { ciphertext: w.ciphertext, key: w.key, version: w.version }
        });
        (result, touched)
    }
}

/// The body the batch RPCs share: every item through the single RPC's code
/// (authorized for its own key), its outcome tallied for the audit, its
/// result or error in the answer.
macro_rules! batch {
    ($self:ident, $request:ident, $rpc:literal, $one:ident, $response:ident, $result:ident, $module:ident) => {{
        let call = $self.guards.call($rpc, &$request)?;
        let req = $request.into_inner();
        let mut groups = Groups::new();
        let result = async {
            $self.check_batch(&call, req.items.len())?;
            let mut results = Vec::with_capacity(req.items.len());
            for item in &req.items {
                let (result, touched) = $self.$one(&call, item).await;
                tally(&mut groups, touched, &result);
                results.push(pb::$result {
                    result: Some(match result {
                        Ok(ok) => pb::$module::Result::Ok(ok),
                        Err(err) => pb::$module::Result::Error(item_error(&err)),
                    }),
                });
            }
            Ok(pb::$response { results })
        }
        .await;
        call.finish_batch(groups, result).await
    }};
}

/// The RPCs, as inherent methods: the data plane's own framing
/// ([`super::unary`]) awaits them directly, with no boxed future per call;
/// the `KeyBroker` trait (tonic's generated server, for compressed
/// requests) forwards to them.
impl KeyBrokerService {
    /// Wrap: a DEK sealed under the key's current version.
    pub async fn wrap(&self, request: Request<pb::WrapRequest>) -> Result<Response<pb::WrapResponse>, Status> {
        let call = self.guards.call("Wrap", &request)?;
        let (result, touched) = self.wrap_one(&call, request.get_ref()).await;
        call.finish_data(touched, result).await
    }

    /// Unwrap: the DEK of a ciphertext, under the version its header names.
    pub async fn unwrap(&self, request: Request<pb::UnwrapRequest>) -> Result<Response<pb::UnwrapResponse>, Status> {
        let call = self.guards.call("Unwrap", &request)?;
        let (result, touched) = self.unwrap_one(&call, request.get_ref()).await;
        call.finish_data(touched, result).await
    }

    /// GenerateDataKey: a fresh DEK and its wrapped form.
    pub async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let call = self.guards.call("GenerateDataKey", &request)?;
        let req = request.into_inner();
        let mut touched = Touched { context_sha256: call.context_hash(&req.context), ..Touched::key(&req.key) };
        let result = match call.allow(Rpc::GenerateDataKey, &req.key) {
            Ok(()) => self.broker.generate_data_key(&req.key, req.length, &req.context).await,
            Err(err) => Err(err),
        };
        let result = result.map(|(dek, w)| {
            touched.version = w.version;
            touched.backend = w.backend;
            pb::GenerateDataKeyResponse {
                plaintext: if req.without_plaintext { Vec::new() } else { dek.to_vec() },
                ciphertext: w.ciphertext,
                key: w.key,
                version: w.version,
            }
        });
        call.finish_data(touched, result).await
    }

    /// Rewrap: a ciphertext moved to the key's current version.
    pub async fn rewrap(&self, request: Request<pb::RewrapRequest>) -> Result<Response<pb::RewrapResponse>, Status> {
        let call = self.guards.call("Rewrap", &request)?;
        let (result, touched) = self.rewrap_one(&call, request.get_ref()).await;
        call.finish_data(touched, result).await
    }

    /// BatchWrap: Wrap per item, runs of one key resolved and sealed once.
    pub async fn batch_wrap(
        &self,
        request: Request<pb::BatchWrapRequest>,
    ) -> Result<Response<pb::BatchWrapResponse>, Status> {
        let call = self.guards.call("BatchWrap", &request)?;
        let req = request.into_inner();
        let mut groups = Groups::new();
        let result = async {
            self.check_batch(&call, req.items.len())?;
            let mut results = Vec::with_capacity(req.items.len());
            // Runs of items of one key: decided, resolved and sealed once.
            for run in req.items.chunk_by(|a, b| a.key == b.key) {
                let key = &run[0].key;
                let items: Vec<WrapItem<'_>> =
                    run.iter().map(|i| WrapItem { plaintext: &i.plaintext, context: &i.context }).collect();
                let wrapped = match call.allow(Rpc::Wrap, key) {
                    Ok(()) => self.broker.wrap_run(key, &items).await,
                    Err(err) => Err(err),
                };
                let wrapped = match wrapped {
                    Ok(wrapped) => wrapped,
                    Err(err) => {
                        let entry = groups.entry((key.clone(), 0, String::new(), code_name(Some(err.code()))));
                        entry.or_insert((0, Some(err.code()))).0 += run.len() as u64;
                        let error = item_error(&err);
                        results.extend(run.iter().map(|_| pb::BatchWrapResult {
                            result: Some(pb::batch_wrap_result::Result::Error(error.clone())),
                        }));
                        continue;
                    }
                };
                // Outcomes of the run by code, entered in the audit tally once each.
                let mut outcomes: Vec<(Option<ErrorCode>, u64)> = Vec::new();
                for ciphertext in wrapped.ciphertexts {
                    let code = ciphertext.as_ref().err().map(ServiceError::code);
                    match outcomes.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, n)) => *n += 1,
                        None => outcomes.push((code, 1)),
                    }
                    results.push(pb::BatchWrapResult {
                        result: Some(match ciphertext {
                            Ok(ciphertext) => pb::batch_wrap_result::Result::Ok(pb::WrapResponse {
                                ciphertext,
                                key: key.clone(),
                                version: wrapped.version,
                            }),
                            Err(err) => pb::batch_wrap_result::Result::Error(item_error(&err)),
                        }),
                    });
                }
                for (code, n) in outcomes {
                    let entry = groups.entry((key.clone(), wrapped.version, wrapped.backend.clone(), code_name(code)));
                    entry.or_insert((0, code)).0 += n;
                }
            }
            Ok(pb::BatchWrapResponse { results })
        }
        .await;
        call.finish_batch(groups, result).await
    }

    /// BatchUnwrap: Unwrap per item.
    pub async fn batch_unwrap(
        &self,
        request: Request<pb::BatchUnwrapRequest>,
    ) -> Result<Response<pb::BatchUnwrapResponse>, Status> {
        batch!(self, request, "BatchUnwrap", unwrap_one, BatchUnwrapResponse, BatchUnwrapResult, batch_unwrap_result)
    }

    /// BatchRewrap: Rewrap per item.
    pub async fn batch_rewrap(
        &self,
        request: Request<pb::BatchRewrapRequest>,
    ) -> Result<Response<pb::BatchRewrapResponse>, Status> {
        batch!(self, request, "BatchRewrap", rewrap_one, BatchRewrapResponse, BatchRewrapResult, batch_rewrap_result)
    }
}

#[tonic::async_trait]
impl KeyBroker for KeyBrokerService {
    async fn wrap(&self, request: Request<pb::WrapRequest>) -> Result<Response<pb::WrapResponse>, Status> {
        KeyBrokerService::wrap(self, request).await
    }

    async fn unwrap(&self, request: Request<pb::UnwrapRequest>) -> Result<Response<pb::UnwrapResponse>, Status> {
        KeyBrokerService::unwrap(self, request).await
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        KeyBrokerService::generate_data_key(self, request).await
    }

    async fn rewrap(&self, request: Request<pb::RewrapRequest>) -> Result<Response<pb::RewrapResponse>, Status> {
        KeyBrokerService::rewrap(self, request).await
    }

    async fn batch_wrap(
        &self,
        request: Request<pb::BatchWrapRequest>,
    ) -> Result<Response<pb::BatchWrapResponse>, Status> {
        KeyBrokerService::batch_wrap(self, request).await
    }

    async fn batch_unwrap(
        &self,
        request: Request<pb::BatchUnwrapRequest>,
    ) -> Result<Response<pb::BatchUnwrapResponse>, Status> {
        KeyBrokerService::batch_unwrap(self, request).await
    }

    async fn batch_rewrap(
        &self,
        request: Request<pb::BatchRewrapRequest>,
    ) -> Result<Response<pb::BatchRewrapResponse>, Status> {
        KeyBrokerService::batch_rewrap(self, request).await
    }
}
