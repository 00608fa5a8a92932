//! The dispatcher's HTTP API, as `heraldctl` calls it: one request, its JSON answer, and an
//! error that names the API's `error` and `reason` when it refuses.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub(crate) fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let token = token
            .or_else(|| std::env::var("HERALD_ADMIN_TOKEN").ok())
            .filter(|t| !t.is_empty())
            .context("no API token: set --token, HERALD_API_TOKEN or HERALD_ADMIN_TOKEN")?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().context("an HTTP client")?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), token })
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.get(self.url(path))).await
    }

    pub(crate) async fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.post(self.url(path))).await
    }

    pub(crate) async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.delete(self.url(path))).await
    }

    /// The status and body, whatever the status.
    pub(crate) async fn get_any(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let url = self.url(path);
        let response =
            self.http.get(&url).bearer_auth(&self.token).send().await.with_context(|| format!("calling {url}"))?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let request = request.bearer_auth(&self.token).build().context("building the request")?;
        let url = request.url().to_string();
        let response = self.http.execute(request).await.with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let error = body["error"].as_str().unwrap_or("error");
            let reason = body["reason"].as_str().unwrap_or("no reason given");
            bail!("{} {error}: {reason}", status.as_u16());
        }
        Ok(body)
    }
}

/// `value` as one path segment: everything but unreserved characters percent-encoded (user ids
/// may hold `/`, `@`, spaces).
pub(crate) fn segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Polls the message until no receipt is pending, printing each receipt's state as it changes;
/// an error if some are still pending after `within`.
pub(crate) async fn follow_receipts(api: &Api, id: &str, within: Duration, json: bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let path = format!("/v1/messages/{}", segment(id));
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let (status, body) = api.get_any(&path).await?;
        match status {
            200 => {
                let receipts = body["receipts"].as_array().cloned().unwrap_or_default();
                for r in &receipts {
                    let (user, state) = (r["user"].as_str().unwrap_or("?"), r["state"].as_str().unwrap_or("?"));
                    if seen.get(user).map(String::as_str) != Some(state) {
                        seen.insert(user.to_owned(), state.to_owned());
                        if json {
                            println!("{}", serde_json::to_string(r)?);
                        } else {
                            println!("{user}: {state}");
                        }
                    }
                }
                if !receipts.is_empty() && receipts.iter().all(|r| r["state"] != "pending") {
                    return Ok(());
                }
            }
            // Not stored yet: the dispatcher has not taken the job.
            404 => {}
            _ => bail!("{status} {}: {}", body["error"].as_str().unwrap_or("error"), body["reason"]),
        }
        if tokio::time::Instant::now() >= deadline {
            let pending: Vec<&str> = seen.iter().filter(|(_, s)| *s == "pending").map(|(u, _)| u.as_str()).collect();
            if seen.is_empty() {
                bail!("{id} was not stored within {within:?}; see `heraldctl rejections`");
            }
            bail!("still pending after {within:?}: {}", pending.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("order-1.a_b~"), "order-1.a_b~");
        assert_eq!(segment("org/alice b@x"), "org%2Falice%20b%40x");
        assert_eq!(segment("é"), "%C3%A9");
    }
}
