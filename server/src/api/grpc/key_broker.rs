//! `keybroker.v1.KeyBroker`: Wrap, Unwrap, GenerateDataKey, Rewrap and their
//! batch forms.

use std::sync::Arc;

use keybroker_client::pb;
use keybroker_client::pb::key_broker_server::KeyBroker;
use tonic::{Request, Response, Status};

use super::{Audit, item_error, respond};
use crate::core::broker::Broker;
use crate::error::{ServiceError, ServiceResult};

/// The data-plane service.
pub struct KeyBrokerService {
    broker: Arc<Broker>,
}

impl KeyBrokerService {
    /// A service over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }

    fn check_batch(&self, len: usize) -> ServiceResult<()> {
        let max = self.broker.limits().max_batch_items;
        if len > max {
            return Err(ServiceError::invalid(format!(
                "batch has {len} items; the limit is {max} (limits.max_batch_items)"
            )));
        }
        Ok(())
    }

    async fn wrap_one(&self, req: &pb::WrapRequest) -> ServiceResult<pb::WrapResponse> {
        let w = self.broker.wrap(&req.key, &req.plaintext, &req.context).await?;
        Ok(pb::WrapResponse { ciphertext: w.ciphertext, key: w.key, version: w.version })
    }

    async fn unwrap_one(&self, req: &pb::UnwrapRequest) -> ServiceResult<pb::UnwrapResponse> {
        let u = self.broker.unwrap(&req.ciphertext, &req.context).await?;
        Ok(pb::UnwrapResponse {
            plaintext: u.plaintext.to_vec(),
            key: u.key,
            version: u.version,
            rewrap_advised: u.rewrap_advised,
        })
    }

    async fn rewrap_one(&self, req: &pb::RewrapRequest) -> ServiceResult<pb::RewrapResponse> {
        let w = self.broker.rewrap(&req.ciphertext, &req.context, &req.target_key).await?;
        Ok(pb::RewrapResponse { ciphertext: w.ciphertext, key: w.key, version: w.version })
    }
}

/// Key and version to audit for a result that carries them.
fn audited<T>(result: &ServiceResult<T>, key_of: impl Fn(&T) -> (&str, u32)) -> (String, u32) {
    match result {
        Ok(r) => {
            let (k, v) = key_of(r);
            (k.to_owned(), v)
        }
        Err(_) => (String::new(), 0),
    }
}

#[tonic::async_trait]
impl KeyBroker for KeyBrokerService {
    async fn wrap(&self, request: Request<pb::WrapRequest>) -> Result<Response<pb::WrapResponse>, Status> {
        let audit = Audit::start("Wrap", &request);
        let req = request.into_inner();
        let result = self.wrap_one(&req).await;
        audit.finish(&req.key, result.as_ref().map_or(0, |r| r.version), &result);
        respond(result)
    }

    async fn unwrap(&self, request: Request<pb::UnwrapRequest>) -> Result<Response<pb::UnwrapResponse>, Status> {
        let audit = Audit::start("Unwrap", &request);
        let result = self.unwrap_one(request.get_ref()).await;
        let (key, version) = audited(&result, |r| (r.key.as_str(), r.version));
        audit.finish(&key, version, &result);
        respond(result)
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let audit = Audit::start("GenerateDataKey", &request);
        let req = request.into_inner();
        let result = self.broker.generate_data_key(&req.key, req.length, &req.context).await.map(|(dek, w)| {
            pb::GenerateDataKeyResponse {
                plaintext: if req.without_plaintext { Vec::new() } else { dek.to_vec() },
                ciphertext: w.ciphertext,
                key: w.key,
                version: w.version,
            }
        });
        audit.finish(&req.key, result.as_ref().map_or(0, |r| r.version), &result);
        respond(result)
    }

    async fn rewrap(&self, request: Request<pb::RewrapRequest>) -> Result<Response<pb::RewrapResponse>, Status> {
        let audit = Audit::start("Rewrap", &request);
        let result = self.rewrap_one(request.get_ref()).await;
        let (key, version) = audited(&result, |r| (r.key.as_str(), r.version));
        audit.finish(&key, version, &result);
        respond(result)
    }

    async fn batch_wrap(
        &self,
        request: Request<pb::BatchWrapRequest>,
    ) -> Result<Response<pb::BatchWrapResponse>, Status> {
        let audit = Audit::start("BatchWrap", &request);
        let req = request.into_inner();
        let result = async {
            self.check_batch(req.items.len())?;
            let mut results = Vec::with_capacity(req.items.len());
            for item in &req.items {
                results.push(pb::BatchWrapResult {
                    result: Some(match self.wrap_one(item).await {
                        Ok(ok) => pb::batch_wrap_result::Result::Ok(ok),
                        Err(err) => pb::batch_wrap_result::Result::Error(item_error(&err)),
                    }),
                });
            }
            Ok(pb::BatchWrapResponse { results })
        }
        .await;
        audit.finish("", 0, &result);
        respond(result)
    }

    async fn batch_unwrap(
        &self,
        request: Request<pb::BatchUnwrapRequest>,
    ) -> Result<Response<pb::BatchUnwrapResponse>, Status> {
        let audit = Audit::start("BatchUnwrap", &request);
        let req = request.into_inner();
        let result = async {
            self.check_batch(req.items.len())?;
            let mut results = Vec::with_capacity(req.items.len());
            for item in &req.items {
                results.push(pb::BatchUnwrapResult {
                    result: Some(match self.unwrap_one(item).await {
                        Ok(ok) => pb::batch_unwrap_result::Result::Ok(ok),
                        Err(err) => pb::batch_unwrap_result::Result::Error(item_error(&err)),
                    }),
                });
            }
            Ok(pb::BatchUnwrapResponse { results })
        }
        .await;
        audit.finish("", 0, &result);
        respond(result)
    }

    async fn batch_rewrap(
        &self,
        request: Request<pb::BatchRewrapRequest>,
    ) -> Result<Response<pb::BatchRewrapResponse>, Status> {
        let audit = Audit::start("BatchRewrap", &request);
        let req = request.into_inner();
        let result = async {
            self.check_batch(req.items.len())?;
            let mut results = Vec::with_capacity(req.items.len());
            for item in &req.items {
                results.push(pb::BatchRewrapResult {
                    result: Some(match self.rewrap_one(item).await {
                        Ok(ok) => pb::batch_rewrap_result::Result::Ok(ok),
                        Err(err) => pb::batch_rewrap_result::Result::Error(item_error(&err)),
                    }),
                });
            }
            Ok(pb::BatchRewrapResponse { results })
        }
        .await;
        audit.finish("", 0, &result);
        respond(result)
    }
}
