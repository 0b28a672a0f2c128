//! A small HTTP client for the admin API.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::AUTHORIZATION;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Generous: a switchover answers only once it is over.
const TIMEOUT: Duration = Duration::from_secs(180);

pub struct AdminClient {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(base: &str) -> Result<Self, String> {
        if !base.starts_with("http://") {
            return Err(format!("--admin {base:?}: expected http://HOST:PORT"));
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        })
    }

    pub async fn get(&self, path: &str) -> Result<String, String> {
        let request = Request::get(format!("{}{path}", self.base))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        self.send(request).await
    }

    pub async fn post(&self, path: &str, token: &str) -> Result<String, String> {
        self.post_body(path, token, Bytes::new()).await
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: &str,
        body: &impl serde::Serialize,
    ) -> Result<String, String> {
        let json = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        self.post_body(path, token, Bytes::from(json)).await
    }

    async fn post_body(&self, path: &str, token: &str, body: Bytes) -> Result<String, String> {
        let request = Request::post(format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        self.send(request).await
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<String, String> {
        let uri = request.uri().to_string();
        let response = tokio::time::timeout(TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| format!("{uri}: no answer within {TIMEOUT:?}"))?
            .map_err(|e| format!("{uri}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{uri}: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("{uri}: HTTP {status}: {}", text.trim()))
        }
    }
}
