//! The connection: greeting, capability negotiation, id-matched commands, and events.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::QmpError;
use crate::types::{Event, MigrationCapability, MigrationInfo, MigrationStatus, StatusInfo};

type Reply = Result<Value, QmpError>;
type Pending = Arc<StdMutex<HashMap<u64, (String, oneshot::Sender<Reply>)>>>;

/// Events buffered per subscriber before the slowest one starts losing them.
const EVENT_BUFFER: usize = 64;
/// A QMP line longer than this is not QMP (replies the runtime reads are small).
const MAX_LINE: usize = 16 << 20;

/// A QMP connection, ready for commands. Cheap to share behind an `Arc`; commands may run
/// concurrently. Dropping it closes the socket.
#[derive(Debug)]
pub struct Qmp {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    closed: watch::Receiver<bool>,
    reader: JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and negotiates capabilities.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path.as_ref()).await?;
        Self::handshake(stream).await
    }

    /// Like [`Qmp::connect`], retrying until the socket accepts or `timeout` passes: QEMU
    /// creates the socket some milliseconds after it starts.
    pub async fn connect_retry(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path.as_ref()).await {
                Ok(stream) => return Self::handshake(stream).await,
                Err(err) if Instant::now() >= deadline => {
                    tracing::debug!(%err, "QMP socket never accepted");
                    return Err(QmpError::Timeout {
                        what: "QMP connect".into(),
                        after: timeout,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// Runs the handshake on an already connected stream.
    pub async fn handshake(stream: UnixStream) -> Result<Self, QmpError> {
        let (read, write) = stream.into_split();
        let mut read = BufReader::new(read);
        let greeting = read_message(&mut read)
            .await?
            .ok_or(QmpError::Disconnected)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(read_loop(read, pending.clone(), events.clone(), closed_tx));
        let qmp = Qmp {
            writer: Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            closed,
            reader,
        };
        qmp.execute_raw("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Subscribes to asynchronous events. Subscribe before issuing the command whose event
    /// you wait for, or it may be missed.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Runs a command and returns its raw `return` value.
    pub async fn execute_raw(&self, command: &str, arguments: Option<Value>) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, (command.to_owned(), tx));
        if self.is_closed() {
            lock(&self.pending).remove(&id);
            return Err(QmpError::Disconnected);
        }
        let mut line = msg.to_string();
        line.push('\n');
        let written = {
            let mut writer = self.writer.lock().await;
            writer.write_all(line.as_bytes()).await
        };
        if let Err(err) = written {
            lock(&self.pending).remove(&id);
            return Err(err.into());
        }
        rx.await.unwrap_or(Err(QmpError::Disconnected))
    }

    /// Runs a command and decodes its `return` value.
    pub async fn execute<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute_raw(command, arguments).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode {
            command: command.to_owned(),
            source,
        })
    }

    /// Pauses the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute_raw("stop", None).await.map(drop)
    }

    /// Resumes the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute_raw("cont", None).await.map(drop)
    }

    /// The VM's run state.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute("query-status", None).await
    }

    /// Sets migration capabilities; must be set identically on the source and destination.
    pub async fn migrate_set_capabilities(
        &self,
        caps: &[(MigrationCapability, bool)],
    ) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(cap, on)| json!({ "capability": cap, "state": on }))
            .collect();
        self.execute_raw(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .await
        .map(drop)
    }

    /// Starts an outgoing migration to `uri` (e.g. `file:/path/state`). Returns once started;
    /// poll [`Qmp::wait_migration`] for the end.
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute_raw("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Starts an incoming migration from `uri` in a QEMU started with `-incoming defer`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute_raw("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// The state of the current or last migration.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.execute("query-migrate", None).await
    }

    /// Polls `query-migrate` every `poll` until the migration is final. `completed` returns its
    /// info; `failed`/`cancelled` is an error carrying QEMU's description.
    pub async fn wait_migration(
        &self,
        poll: Duration,
        timeout: Duration,
    ) -> Result<MigrationInfo, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate().await?;
            match &info.status {
                Some(MigrationStatus::Completed) => return Ok(info),
                Some(status) if status.is_final() => {
                    return Err(QmpError::MigrationFailed {
                        status: format!("{status:?}").to_lowercase(),
                        desc: info.error_desc.unwrap_or_default(),
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout {
                    what: "migration".into(),
                    after: timeout,
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Takes up to `size` bytes from ring-buffer chardev `device` (`ringbuf-read`, base64):
    /// what was written since the last read, oldest first (the ring keeps only the newest
    /// bytes of its size).
    pub async fn ringbuf_read(&self, device: &str, size: u32) -> Result<Vec<u8>, QmpError> {
        use base64::Engine as _;
        let data: String = self
            .execute(
                "ringbuf-read",
                Some(json!({ "device": device, "size": size, "format": "base64" })),
            )
            .await?;
        base64::engine::general_purpose::STANDARD
            .decode(data.as_bytes())
            .map_err(|e| QmpError::Protocol(format!("ringbuf-read: not base64: {e}")))
    }

    /// Asks QEMU to exit. QEMU may close the socket before replying; that counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute_raw("quit", None).await {
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Waits for the next event called `name` on a receiver from [`Qmp::events`].
    pub async fn wait_event(
        &self,
        events: &mut broadcast::Receiver<Event>,
        name: &str,
        timeout: Duration,
    ) -> Result<Event, QmpError> {
        let mut closed = self.closed.clone();
        let wait = async {
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) if ev.name == name => return Ok(ev),
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Disconnected),
                    },
                    changed = closed.wait_for(|c| *c) => {
                        let _ = changed;
                        return Err(QmpError::Disconnected);
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("event {name}"),
                after: timeout,
            })?
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map only means another task panicked mid-insert; the map is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one JSON message (one line). `None` at end of stream.
async fn read_message(read: &mut BufReader<OwnedReadHalf>) -> Result<Option<Value>, QmpError> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut *read)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        if !line.ends_with('\n') && n >= MAX_LINE {
            return Err(QmpError::Protocol("line too long".into()));
        }
        if line.trim().is_empty() {
            continue;
        }
        return serde_json::from_str(line.trim())
            .map(Some)
            .map_err(|e| QmpError::Protocol(format!("{e}: {}", line.trim())));
    }
}

async fn read_loop(
    mut read: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    closed: watch::Sender<bool>,
) {
    loop {
        let msg = match read_message(&mut read).await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            // QEMU resets the socket when it exits after `quit`: that is an ordinary close.
            Err(QmpError::Io(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(err) => {
                tracing::warn!(%err, "QMP read failed; closing");
                break;
            }
        };
        dispatch(msg, &pending, &events);
    }
    closed.send_replace(true);
    for (_, (_, tx)) in lock(&pending).drain() {
        let _ = tx.send(Err(QmpError::Disconnected));
    }
}

fn dispatch(msg: Value, pending: &Pending, events: &broadcast::Sender<Event>) {
    if msg.get("event").is_some() {
        match serde_json::from_value::<Event>(msg) {
            // No subscribers is fine: nobody is waiting for events.
            Ok(ev) => drop(events.send(ev)),
            Err(err) => tracing::warn!(%err, "malformed QMP event"),
        }
        return;
    }
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        tracing::warn!(%msg, "QMP reply without a known id");
        return;
    };
    let Some((command, tx)) = lock(pending).remove(&id) else {
        tracing::debug!(id, "QMP reply for a command nobody waits for");
        return;
    };
    let reply = if let Some(ret) = msg.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = msg.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Err(QmpError::Command {
            command,
            class: field("class"),
            desc: field("desc"),
        })
    } else {
        Err(QmpError::Protocol(format!(
            "reply with neither return nor error: {msg}"
        )))
    };
    let _ = tx.send(reply);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A fake QEMU: greets, then answers each command with `respond(command, id)`'s lines.
    async fn fake_peer(
        respond: impl Fn(&str, &Value) -> Vec<String> + Send + 'static,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        JoinHandle<Vec<Value>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            write
                .write_all(format!("{GREETING}\r\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(read).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let msg: Value = serde_json::from_str(&line).unwrap();
                let cmd = msg["execute"].as_str().unwrap().to_owned();
                for out in respond(&cmd, &msg["id"]) {
                    write
                        .write_all(format!("{out}\r\n").as_bytes())
                        .await
                        .unwrap();
                }
                seen.push(msg);
                if cmd == "quit" {
                    break;
                }
            }
            seen
        });
        (dir, path, task)
    }

    #[tokio::test]
    async fn negotiates_and_matches_replies_by_id() {
        let (_dir, path, peer) = fake_peer(|cmd, id| match cmd {
            "query-status" => vec![
                // An event arriving before the reply must not be taken for it.
                r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#.into(),
                json!({"return": {"status": "paused", "singlestep": false, "running": false}, "id": id}).to_string(),
            ],
            "quit" => vec![],
            _ => vec![json!({"return": {}, "id": id}).to_string()],
        })
        .await;
        let qmp = Qmp::connect(&path).await.unwrap();
        let mut events = qmp.events();
        let status = qmp.query_status().await.unwrap();
        assert_eq!(
            status,
            StatusInfo {
                running: false,
                status: "paused".into()
            }
        );
        let ev = qmp
            .wait_event(&mut events, "STOP", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(ev.timestamp.microseconds, 2);
        qmp.migrate_set_capabilities(&[(MigrationCapability::XIgnoreShared, true)])
            .await
            .unwrap();
        qmp.quit().await.unwrap();
        let seen = peer.await.unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(
            seen[2]["arguments"],
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})
        );
        // Ids are unique.
        let mut ids: Vec<_> = seen.iter().map(|m| m["id"].as_u64().unwrap()).collect();
        ids.dedup();
        assert_eq!(ids.len(), seen.len());
    }

    #[tokio::test]
    async fn command_errors_are_typed() {
        let (_dir, path, _peer) = fake_peer(|cmd, id| match cmd {
            "cont" => vec![
                json!({"error": {"class": "GenericError", "desc": "no"}, "id": id}).to_string(),
            ],
            _ => vec![json!({"return": {}, "id": id}).to_string()],
        })
        .await;
        let qmp = Qmp::connect(&path).await.unwrap();
        match qmp.cont().await {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("cont", "GenericError", "no")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn migration_polling_reports_failure() {
        let (_dir, path, _peer) = fake_peer(|cmd, id| match cmd {
            "query-migrate" => vec![
                json!({"return": {"status": "failed", "error-desc": "disk full"}, "id": id})
                    .to_string(),
            ],
            _ => vec![json!({"return": {}, "id": id}).to_string()],
        })
        .await;
        let qmp = Qmp::connect(&path).await.unwrap();
        let err = qmp
            .wait_migration(Duration::from_millis(1), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, QmpError::MigrationFailed { ref desc, .. } if desc == "disk full"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn peer_closing_fails_pending_commands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream
                .write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            let msg: Value = serde_json::from_slice(&buf[..n]).unwrap();
            let reply = json!({"return": {}, "id": msg["id"]});
            stream
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .unwrap();
            // Read the next command, then hang up without answering.
            let _ = stream.read(&mut buf).await.unwrap();
        });
        let qmp = Qmp::connect(&path).await.unwrap();
        assert!(matches!(qmp.stop().await, Err(QmpError::Disconnected)));
        assert!(qmp.is_closed());
        assert!(matches!(
            qmp.query_status().await,
            Err(QmpError::Disconnected)
        ));
    }

    #[tokio::test]
    async fn rejects_a_peer_that_is_not_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"{\"hello\": 1}\n").await.unwrap();
        });
        assert!(matches!(
            Qmp::connect(&path).await,
            Err(QmpError::Protocol(_))
        ));
    }
}
