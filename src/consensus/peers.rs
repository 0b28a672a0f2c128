//! Talking to every voter of the cluster: this member's own voter
//! in-process, the others over HTTP/JSON with the cluster token.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::messages::{
    LeaseRequest, LeaseResponse, PublishRequest, ReleaseRequest, StateResponse, SyncRequest,
    VoteRequest, VoteResponse,
};
use super::record::VoterRecord;
use super::voter::Voter;
use crate::config::{Secret, VoterSpec};

/// One voter's answer, or why there was none.
pub type Reply<T> = Result<T, String>;

pub struct Peers {
    me: Arc<Voter>,
    others: Vec<VoterSpec>,
    token: Option<Secret>,
    http: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Peers {
    /// `voters` is the configured list; the entry named like this member is
    /// served in-process.
    pub fn new(
        me: Arc<Voter>,
        voters: &[VoterSpec],
        token: Option<Secret>,
        timeout: Duration,
    ) -> Self {
        let others = voters
            .iter()
            .filter(|v| v.name != me.name)
            .cloned()
            .collect();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Self {
            me,
            others,
            token,
            http: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    pub fn me(&self) -> &Arc<Voter> {
        &self.me
    }

    /// Every configured voter, this member included.
    pub fn count(&self) -> usize {
        self.others.len() + 1
    }

    pub fn other_names(&self) -> impl Iterator<Item = &str> {
        self.others.iter().map(|v| v.name.as_str())
    }

    /// Asks the other voters first and casts this member's own vote last,
    /// only when it completes a majority: a candidate that cannot win
    /// leaves no vote of its own standing in another candidate's way.
    /// Stops asking once enough granted: a frozen or far voter must not
    /// slow a failover that already has its votes.
    pub async fn request_votes(&self, request: &VoteRequest) -> Vec<Reply<VoteResponse>> {
        let needed = super::majority(self.count());
        let mut replies = self
            .ask_until_granted(
                Vec::new(),
                "/v1/vote",
                request,
                |r: &VoteResponse| r.granted,
                needed - 1,
            )
            .await;
        let granted = replies.iter().flatten().filter(|r| r.granted).count();
        if granted + 1 >= needed {
            replies.insert(0, Ok(self.me.vote(request)));
        }
        replies
    }

    pub async fn renew_leases(&self, request: &LeaseRequest) -> Vec<Reply<LeaseResponse>> {
        let mine = vec![Ok(self.me.lease(request))];
        let needed = super::majority(self.count());
        self.ask_until_granted(mine, "/v1/lease", request, |r| r.granted, needed)
            .await
    }

    /// Frees the votes this member got for `term` on every voter (best
    /// effort): a lost election must not hold up the next one.
    pub async fn release_votes(&self, term: u64) {
        self.me.release_vote(term, &self.me.name);
        let request = ReleaseRequest {
            term,
            candidate: self.me.name.clone(),
        };
        let _ = self
            .ask_all::<_, serde_json::Value>(
                Ok(serde_json::Value::Null),
                "/v1/release",
                Some(&request),
            )
            .await;
    }

    pub async fn publish(&self, request: &PublishRequest) -> Vec<Reply<VoterRecord>> {
        let mine = self.me.publish(request);
        self.ask_all(mine, "/v1/publish", Some(request)).await
    }

    /// Records the synchronous standby with every voter (this one first).
    pub async fn record_sync(&self, request: &SyncRequest) -> Vec<Reply<VoterRecord>> {
        let mine = self.me.record_sync(request);
        self.ask_all(mine, "/v1/synchronous", Some(request)).await
    }

    pub async fn states(&self) -> Vec<Reply<StateResponse>> {
        let mine = Ok(StateResponse {
            voter: self.me.name.clone(),
            kind: self.me.kind,
            record: self.me.record(),
        });
        self.ask_all::<(), _>(mine, "/v1/state", None).await
    }

    /// A POST to one named member (e.g. a node agent), bounded by `limit`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        member: &str,
        path: &str,
        body: &B,
        limit: Duration,
    ) -> Reply<T> {
        let peer = self
            .others
            .iter()
            .find(|v| v.name == member)
            .ok_or_else(|| {
                format!("no voter named {member} (is a node agent running beside it?)")
            })?;
        tokio::time::timeout(limit, self.call(peer, path, Some(body)))
            .await
            .map_err(|_| format!("{member}: no answer within {limit:?}"))?
            .map_err(|e| format!("{member}: {e}"))
    }

    /// Asks the other voters in parallel until `needed` replies (counting
    /// `replies` already in hand) granted, or every voter answered or
    /// timed out.
    async fn ask_until_granted<B: Serialize, T: DeserializeOwned>(
        &self,
        mut replies: Vec<Reply<T>>,
        path: &str,
        body: &B,
        granted: impl Fn(&T) -> bool,
        needed: usize,
    ) -> Vec<Reply<T>> {
        let mut asks: FuturesUnordered<_> = self
            .others
            .iter()
            .map(|peer| async move {
                match tokio::time::timeout(self.timeout, self.call(peer, path, Some(body))).await {
                    Ok(reply) => reply.map_err(|e| format!("{}: {e}", peer.name)),
                    Err(_) => Err(format!(
                        "{}: no answer within {:?}",
                        peer.name, self.timeout
                    )),
                }
            })
            .collect();
        let count = |replies: &[Reply<T>]| replies.iter().flatten().filter(|r| granted(r)).count();
        while count(&replies) < needed {
            match asks.next().await {
                Some(reply) => replies.push(reply),
                None => break,
            }
        }
        replies
    }

    /// Asks every other voter in parallel, each bounded by the timeout;
    /// this member's own answer comes first.
    async fn ask_all<B: Serialize, T: DeserializeOwned>(
        &self,
        mine: Reply<T>,
        path: &str,
        body: Option<&B>,
    ) -> Vec<Reply<T>> {
        let asks = self.others.iter().map(|peer| async move {
            match tokio::time::timeout(self.timeout, self.call(peer, path, body)).await {
                Ok(reply) => reply.map_err(|e| format!("{}: {e}", peer.name)),
                Err(_) => Err(format!(
                    "{}: no answer within {:?}",
                    peer.name, self.timeout
                )),
            }
        });
        let mut replies = vec![mine];
        replies.extend(join_all(asks).await);
        replies
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        peer: &VoterSpec,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, String> {
        let uri = format!("{}{path}", peer.url.trim_end_matches('/'));
        let mut builder = Request::builder().uri(&uri);
        if let Some(token) = &self.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let request = match body {
            Some(body) => {
                let json = serde_json::to_vec(body).map_err(|e| e.to_string())?;
                builder
                    .method("POST")
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(json)))
            }
            None => builder.method("GET").body(Full::new(Bytes::new())),
        }
        .map_err(|e| e.to_string())?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("bad answer: {e}"))
    }
}
