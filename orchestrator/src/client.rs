//! A small client of Baton's edge (the same JSON any NATS client sends): what the CLI and
//! the demo use.

use std::time::Duration;

use anyhow::{Context, anyhow};
use async_nats::HeaderMap;
use baton_transport::{
    codec::{CONTENT_TYPE, JSON},
    subject,
    wire::{ApiError, HistoryPages, HistoryRequest, Reply, ResultReply, StartReply, StartRequest},
};
use serde::{Serialize, de::DeserializeOwned};

/// Client of one Baton cluster.
#[derive(Clone)]
pub struct EdgeClient {
    nats: async_nats::Client,
}

impl EdgeClient {
    /// Connects to the NATS server at `url`.
    pub async fn connect(url: &str) -> anyhow::Result<EdgeClient> {
        let nats = async_nats::ConnectOptions::new()
            .request_timeout(Some(Duration::from_secs(30)))
            .connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        Ok(EdgeClient { nats })
    }

    /// Sends a JSON request and decodes the reply, an edge error becoming `Err`.
    pub async fn request<Req: Serialize, Rep: DeserializeOwned>(
        &self,
        subject: String,
        body: &Req,
        timeout: Duration,
    ) -> anyhow::Result<Result<Rep, ApiError>> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, JSON);
        let payload = serde_json::to_vec(body)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let request = async_nats::Request::new()
                .headers(headers.clone())
                .payload(payload.clone().into())
                .timeout(Some(timeout));
            match self.nats.send_request(subject.clone(), request).await {
                Ok(message) => {
                    let reply: Reply<Rep> =
                        serde_json::from_slice(&message.payload).with_context(|| {
                            format!(
                                "undecodable reply: {}",
                                String::from_utf8_lossy(&message.payload)
                            )
                        })?;
                    return Ok(reply.into_result());
                }
                // The orchestrator may still be starting: retry "no responders" briefly.
                Err(e)
                    if e.kind() == async_nats::RequestErrorKind::NoResponders
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow!("request to {subject} failed: {e}")),
            }
        }
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Starts a workflow.
    pub async fn start(
        &self,
        workflow_type: &str,
        workflow_id: Option<String>,
        input: serde_json::Value,
    ) -> anyhow::Result<Result<StartReply, ApiError>> {
        let body = StartRequest {
            workflow_id,
            input,
            ..Default::default()
        };
        self.start_with(workflow_type, &body).await
    }

    /// Starts a workflow with a full request (policies, signal-with-start, timeout).
    pub async fn start_with(
        &self,
        workflow_type: &str,
        body: &StartRequest,
    ) -> anyhow::Result<Result<StartReply, ApiError>> {
        self.request(subject::start(workflow_type), body, Duration::from_secs(30))
            .await
    }

    /// Reads a workflow's result, waiting for it up to `wait`.
    pub async fn result(
        &self,
        workflow_id: &str,
        wait: Duration,
    ) -> anyhow::Result<Result<ResultReply, ApiError>> {
        let body =
            serde_json::json!({"workflow_id": workflow_id, "wait_ms": wait.as_millis() as u64});
        self.request(
            subject::API_RESULT.into(),
            &body,
            wait + Duration::from_secs(10),
        )
        .await
    }

    /// Waits until the workflow closes.
    pub async fn wait_result(
        &self,
        workflow_id: &str,
    ) -> anyhow::Result<Result<ResultReply, ApiError>> {
        loop {
            match self.result(workflow_id, Duration::from_secs(60)).await? {
                Ok(ResultReply::Running) => continue,
                other => return Ok(other),
            }
        }
    }

    /// A workflow's whole history (`{workflow_id, run_id, events}`), read page by page so
    /// that a history larger than one message (large payloads) can be read.
    pub async fn history(
        &self,
        workflow_id: &str,
    ) -> anyhow::Result<Result<serde_json::Value, ApiError>> {
        let mut pages = HistoryPages::new(HistoryRequest {
            workflow_id: workflow_id.into(),
            ..Default::default()
        });
        while let Some(request) = pages.next_request() {
            match self.api("history", serde_json::to_value(request)?).await? {
                Ok(page) => pages.add(page)?,
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(pages.into_whole().expect("at least one page")))
    }

    /// Any other API call (`describe`, `list`, a single `history` page).
    pub async fn api(
        &self,
        verb: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<Result<serde_json::Value, ApiError>> {
        self.request(format!("baton.api.{verb}"), &body, Duration::from_secs(30))
            .await
    }
}
