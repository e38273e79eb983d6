//! Idempotent requests: the answer to each request ID is remembered, and a second request
//! with the same ID gets it without doing the work again. A request still running makes
//! the second one wait for its answer.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use tokio::sync::OnceCell;

/// How many answers are kept: the oldest are forgotten first. A controller retries within
/// seconds, and a new leader replays only the migrations in flight.
const REMEMBERED: usize = 4096;

/// A finished request's answer: its status and JSON body.
pub type Answer = (StatusCode, serde_json::Value);

#[derive(Debug)]
struct Entry {
    /// What the request was (route and body), so a reused ID is caught.
    fingerprint: String,
    answer: Arc<OnceCell<Answer>>,
}

/// The request IDs seen, and their answers.
#[derive(Debug, Default)]
pub struct RequestLog {
    inner: Mutex<Log>,
}

#[derive(Debug, Default)]
struct Log {
    entries: HashMap<String, Entry>,
    order: VecDeque<String>,
}

/// Why a request was not run.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The ID was used before for another request.
    Reused,
    /// The ID is empty or too long.
    BadId,
}

impl RequestLog {
    /// Runs `work` once per `id`: a replay of the same request gets the first answer.
    pub async fn once<F, Fut>(
        &self,
        id: &str,
        fingerprint: String,
        work: F,
    ) -> Result<Answer, Refusal>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Answer>,
    {
        if id.is_empty() || id.len() > 200 {
            return Err(Refusal::BadId);
        }
        let cell = {
            let mut log = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match log.entries.get(id) {
                Some(e) if e.fingerprint != fingerprint => return Err(Refusal::Reused),
                Some(e) => e.answer.clone(),
                None => {
                    let answer = Arc::new(OnceCell::new());
                    log.entries.insert(
                        id.to_string(),
                        Entry {
                            fingerprint,
                            answer: answer.clone(),
                        },
                    );
                    log.order.push_back(id.to_string());
                    while log.order.len() > REMEMBERED {
                        if let Some(old) = log.order.pop_front() {
                            log.entries.remove(&old);
                        }
                    }
                    answer
                }
            }
        };
        Ok(cell.get_or_init(work).await.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn ok(n: u32) -> Answer {
        (StatusCode::OK, serde_json::json!({ "n": n }))
    }

    #[tokio::test]
    async fn the_same_request_twice_does_one_thing() {
        let log = RequestLog::default();
        let runs = AtomicU32::new(0);
        for _ in 0..2 {
            let answer = log
                .once("a", "start x".into(), || async {
                    ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
                })
                .await
                .expect("runs");
            assert_eq!(answer, ok(1));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_replay_during_the_first_waits_for_its_answer() {
        let log = Arc::new(RequestLog::default());
        let runs = Arc::new(AtomicU32::new(0));
        let (l, r) = (log.clone(), runs.clone());
        let first = tokio::spawn(async move {
            l.once("a", "f".into(), || async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                ok(r.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let r = runs.clone();
        let second = log
            .once("a", "f".into(), || async move {
                ok(r.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .await;
        assert_eq!(second, Ok(ok(1)));
        assert_eq!(first.await.expect("joins"), Ok(ok(1)));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_reused_id_is_refused() {
        let log = RequestLog::default();
        let _ = log.once("a", "start x".into(), || async { ok(1) }).await;
        let again = log.once("a", "stop x".into(), || async { ok(2) }).await;
        assert_eq!(again, Err(Refusal::Reused));
        let empty = log.once("", "x".into(), || async { ok(3) }).await;
        assert_eq!(empty, Err(Refusal::BadId));
    }

    #[tokio::test]
    async fn old_answers_are_forgotten_first() {
        let log = RequestLog::default();
        for i in 0..(REMEMBERED as u32 + 1) {
            let _ = log
                .once(&i.to_string(), "x".into(), || async move { ok(i) })
                .await;
        }
        // ID 0 was forgotten: it runs again.
        let again = log.once("0", "x".into(), || async { ok(99) }).await;
        assert_eq!(again, Ok(ok(99)));
        let kept = log.once("5", "x".into(), || async { ok(98) }).await;
        assert_eq!(kept, Ok(ok(5)));
    }
}
