//! The contexts, by id, and the default one that executions without a context use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::Settings;
use crate::context::Context;
use crate::error::ApiError;
use crate::wire::ContextInfo;

pub struct Registry {
    settings: Arc<Settings>,
    /// In creation order, which `GET /contexts` keeps.
    contexts: Mutex<Vec<Arc<Context>>>,
    /// The default context's id; held while it is made, so two first executions share one.
    default: tokio::sync::Mutex<Option<String>>,
}

impl Registry {
    pub fn new(settings: Arc<Settings>) -> Registry {
        Registry {
            settings,
            contexts: Mutex::new(Vec::new()),
            default: tokio::sync::Mutex::new(None),
        }
    }

    fn list_lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Context>>> {
        // A panic while holding it leaves a Vec that is still whole.
        self.contexts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new context with a started worker.
    pub async fn create(
        &self,
        language: Option<&str>,
        cwd: Option<&str>,
    ) -> Result<Arc<Context>, ApiError> {
        normalize_language(language)?;
        let cwd = match cwd.filter(|c| !c.is_empty()) {
            Some(cwd) => self.requested_cwd(cwd)?,
            None => self.default_cwd(),
        };
        let ctx = Arc::new(Context::new(new_id(), cwd, self.settings.clone()));
        ctx.start().await.map_err(ApiError::Start)?;
        self.list_lock().push(ctx.clone());
        tracing::info!(context = ctx.id, cwd = %ctx.cwd.display(), "context created");
        Ok(ctx)
    }

    /// The default context, made when there is none (at start, or after it was deleted).
    pub async fn default_context(&self) -> Result<Arc<Context>, ApiError> {
        let mut default = self.default.lock().await;
        if let Some(ctx) = default.as_deref().and_then(|id| self.get(id)) {
            return Ok(ctx);
        }
        let ctx = self.create(None, None).await?;
        *default = Some(ctx.id.clone());
        Ok(ctx)
    }

    /// The context an execution runs in: its `context_id`, or the default one for its
    /// language (only python).
    pub async fn for_execution(
        &self,
        context_id: Option<&str>,
        language: Option<&str>,
    ) -> Result<Arc<Context>, ApiError> {
        let context_id = context_id.filter(|c| !c.is_empty());
        let language = language.filter(|l| !l.is_empty());
        match (context_id, language) {
            (Some(_), Some(_)) => Err(ApiError::ContextAndLanguage),
            (Some(id), None) => self
                .get(id)
                .ok_or_else(|| ApiError::ContextNotFound(id.into())),
            (None, language) => {
                normalize_language(language)?;
                self.default_context().await
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.list_lock().iter().find(|c| c.id == id).cloned()
    }

    pub fn list(&self) -> Vec<ContextInfo> {
        self.list_lock().iter().map(|c| info(c)).collect()
    }

    /// Takes the context out of the registry and kills its worker.
    pub async fn remove(&self, id: &str) -> Result<(), ApiError> {
        let ctx = {
            let mut list = self.list_lock();
            let at = list
                .iter()
                .position(|c| c.id == id)
                .ok_or_else(|| ApiError::ContextNotFound(id.into()))?;
            list.remove(at)
        };
        ctx.close().await;
        tracing::info!(context = id, "context removed");
        Ok(())
    }

    /// Kills every worker (the server is stopping).
    pub async fn close_all(&self) {
        let all = std::mem::take(&mut *self.list_lock());
        for ctx in all {
            ctx.close().await;
        }
    }

    fn requested_cwd(&self, cwd: &str) -> Result<PathBuf, ApiError> {
        // Relative to the default, as `%cd` in E2B's kernel (started there) would take it.
        let path = self.default_cwd().join(cwd);
        if path.is_dir() {
            Ok(path)
        } else {
            Err(ApiError::BadCwd(cwd.into()))
        }
    }

    /// The configured default cwd, else `$HOME`, else `/` (a guest without `/home/user`,
    /// a test host).
    fn default_cwd(&self) -> PathBuf {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        [Some(self.settings.default_cwd.clone()), home]
            .into_iter()
            .flatten()
            .find(|p| p.is_dir())
            .unwrap_or_else(|| Path::new("/").to_path_buf())
    }
}

pub fn info(ctx: &Context) -> ContextInfo {
    ContextInfo {
        id: ctx.id.clone(),
        language: ctx.language.into(),
        cwd: ctx.cwd.display().to_string(),
    }
}

/// `python` for what means Python (and for no language: the SDKs' default); an error for
/// the languages E2B's template has kernels for and this server does not.
fn normalize_language(language: Option<&str>) -> Result<&'static str, ApiError> {
    let Some(language) = language else {
        return Ok("python");
    };
    match language.trim().to_ascii_lowercase().as_str() {
        "" | "python" | "python3" | "py" => Ok("python"),
        _ => Err(ApiError::UnsupportedLanguage(language.into())),
    }
}

/// A random UUID (v4), from the kernel's RNG at the time of the call: a generator seeded
/// before the memory snapshot would hand every sandbox the same ids.
fn new_id() -> String {
    let mut b = [0u8; 16];
    if let Err(e) = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
    {
        // Only uniqueness within this server matters; fall back to the clock.
        tracing::warn!(error = %e, "read /dev/urandom");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        b = nanos.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages() {
        for l in [None, Some("python"), Some(" Python3 "), Some("py")] {
            assert_eq!(normalize_language(l).unwrap(), "python");
        }
        assert!(matches!(
            normalize_language(Some("r")),
            Err(ApiError::UnsupportedLanguage(_))
        ));
    }

    #[test]
    fn ids_are_uuids() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_id());
    }
}
