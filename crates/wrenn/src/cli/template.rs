//! `wrenn template build|list|delete`: template builds from a Dockerfile through the same REST
//! routes the SDKs' `Template` builder uses (request, context uploads, start, status), with a
//! progress bar over the steps on a terminal and the build log streamed.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::api::Api;
use super::dockerfile::{self, Recipe, Step};
use super::output;

/// Between status polls.
const POLL: Duration = Duration::from_millis(500);

/// `wrenn template` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum TemplateCmd {
    /// Build a template from a Dockerfile (the subset `FROM`, `ARG`, `RUN`, `COPY`, `ENV`,
    /// `WORKDIR`, `USER`, `CMD`/`ENTRYPOINT`), inside a microVM on the host.
    Build(BuildArgs),
    /// List the templates this API key may use.
    #[command(alias = "ls")]
    List,
    /// Delete a template (its sandboxes keep running).
    #[command(alias = "rm")]
    Delete {
        /// Template ID or name.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
pub(super) struct BuildArgs {
    /// The Dockerfile (default: `Dockerfile` in the context).
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// The template's name (`name` or `name:tag`).
    #[arg(long, short = 'n')]
    name: String,
    /// The build context: `COPY` sources are relative to it.
    #[arg(default_value = ".")]
    context: PathBuf,
    /// A value for an `ARG` (repeatable).
    #[arg(long = "build-arg", value_name = "K=V", value_parser = super::parse_kv)]
    build_args: Vec<(String, String)>,
    /// vCPUs of the template's sandboxes (default: its parent's).
    #[arg(long)]
    cpu_count: Option<u32>,
    /// Memory of the template's sandboxes in MiB (default: its parent's).
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Rebuild every step, ignoring cached layers.
    #[arg(long)]
    skip_cache: bool,
    /// Command the snapshot waits for (default: none); the start command is `CMD`.
    #[arg(long)]
    ready_cmd: Option<String>,
    /// Start from this local image instead of what `FROM` names: a `docker save` tarball,
    /// or an OCI image layout (a directory, or a tar of one). Without a Dockerfile, the
    /// template is the image as it is.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
}

/// Runs a template subcommand.
pub(super) async fn run(api: &Api, json_out: bool, cmd: TemplateCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TemplateCmd::List => {
            let resp = api.call(Method::GET, "/templates", None).await?;
            let items = resp.as_array().cloned().unwrap_or_default();
            if json_out {
                output::print_json(&Value::Array(items))?;
            } else {
                print!("{}", template_table(&items));
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCmd::Delete { name } => {
            let path = format!("/templates/{}", super::api::segment(&name)?);
            api.call(Method::DELETE, &path, None).await?;
            if !json_out {
                println!("deleted {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCmd::Build(args) => build(api, args).await,
    }
}

fn template_table(items: &[Value]) -> String {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut out = format!(
        "{:<22} {:<28} {:>4} {:>7} {:>8}  {}\n",
        "TEMPLATE ID", "NAME", "CPU", "MEM MiB", "DISK MiB", "STATUS"
    );
    for t in items {
        let name = t
            .get("names")
            .and_then(Value::as_array)
            .and_then(|n| n.first())
            .and_then(Value::as_str)
            .unwrap_or("-");
        out.push_str(&format!(
            "{:<22} {:<28} {:>4} {:>7} {:>8}  {}\n",
            s(t, "templateID"),
            name,
            n(t, "cpuCount"),
            n(t, "memoryMB"),
            n(t, "diskSizeMB"),
            s(t, "buildStatus"),
        ));
    }
    out
}

/// A `COPY` source packed for upload.
struct Packed {
    hash: String,
    archive: Vec<u8>,
}

/// Packs context path `src` (a file or directory, relative to `context`) as a gzip'd tar
/// with paths relative to the context, as the SDKs pack theirs; symlinks stay links.
fn pack(context: &Path, src: &str) -> anyhow::Result<Packed> {
    let rel = Path::new(src.trim_end_matches('/'));
    if src.contains(['*', '?', '[']) {
        bail!("COPY {src}: wildcards are not supported by `wrenn template build`");
    }
    if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!("COPY {src}: the source must be inside the build context");
    }
    let abs = context.join(rel);
    let meta = std::fs::symlink_metadata(&abs)
        .with_context(|| format!("COPY {src}: {} is not there", abs.display()))?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let name = if rel.as_os_str().is_empty() || rel == Path::new(".") {
        Path::new(".")
    } else {
        rel
    };
    if meta.is_dir() {
        tar.append_dir_all(name, &abs)
    } else {
        tar.append_path_with_name(&abs, name)
    }
    .with_context(|| format!("pack {}", abs.display()))?;
    let archive = tar
        .into_inner()
        .and_then(|gz| gz.finish())
        .context("pack the context")?;
    let mut h = Sha256::new();
    h.update(b"wrenn-copy-v1\0");
    h.update(src.as_bytes());
    h.update(b"\0");
    h.update(&archive);
    Ok(Packed {
        hash: hex::encode(h.finalize()),
        archive,
    })
}

/// The builder steps of `recipe`, with each `COPY`'s archive.
fn steps(recipe: &Recipe, context: &Path) -> anyhow::Result<(Vec<Value>, Vec<Packed>)> {
    let mut out = Vec::new();
    let mut packed = Vec::new();
    for step in &recipe.steps {
        out.push(match step {
            Step::Run(cmd) => json!({"type": "RUN", "args": [cmd]}),
            Step::Env(pairs) => {
                let args: Vec<&str> = pairs
                    .iter()
                    .flat_map(|(k, v)| [k.as_str(), v.as_str()])
                    .collect();
                json!({"type": "ENV", "args": args})
            }
            Step::Workdir(d) => json!({"type": "WORKDIR", "args": [d]}),
            Step::User(u) => json!({"type": "USER", "args": [u]}),
            Step::Copy {
                src,
                dest,
                chown,
                chmod,
            } => {
                let p = pack(context, src)?;
                let user = chown
                    .as_deref()
                    .map(|c| c.split(':').next().unwrap_or(c))
                    .unwrap_or("");
                let step = json!({
                    "type": "COPY",
                    "args": [src.trim_end_matches('/'), dest, user, chmod.clone().unwrap_or_default()],
                    "filesHash": p.hash,
                });
                packed.push(p);
                step
            }
        });
    }
    Ok((out, packed))
}

/// Shows a build's progress: a bar over its steps on a terminal, plain lines otherwise.
struct Shown {
    bar: Option<ProgressBar>,
}

impl Shown {
    fn new(total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{pos}/{len}] {wide_msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self { bar }
    }

    fn line(&self, entry: &Value) {
        let msg = entry.get("message").and_then(Value::as_str).unwrap_or("");
        let step = entry.get("step").and_then(Value::as_str);
        match &self.bar {
            Some(bar) => {
                if let Some(n) = step.and_then(|s| s.parse::<u64>().ok())
                    && msg.starts_with('[')
                {
                    bar.set_position(n.saturating_sub(1));
                    bar.set_message(msg.to_owned());
                }
                bar.println(msg);
            }
            None => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn build(api: &Api, args: BuildArgs) -> anyhow::Result<ExitCode> {
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    let recipe = if args.image.is_some() && args.file.is_none() && !file.exists() {
        dockerfile::Recipe::default()
    } else {
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        let build_args: BTreeMap<String, String> = args.build_args.iter().cloned().collect();
        dockerfile::parse(&text, &build_args)?
    };
    // Read before anything is asked of the API: a bad path fails here, leaving nothing.
    let image = match &args.image {
        Some(path) => Some(ImageArchive::open(path)?),
        None => None,
    };
    for w in &recipe.warnings {
        eprintln!("warning: {w}");
    }
    let (steps, packed) = steps(&recipe, &args.context)?;
    let mut request = json!({"name": args.name});
    if let Some(c) = args.cpu_count {
        request["cpuCount"] = c.into();
    }
    if let Some(m) = args.memory_mb {
        request["memoryMB"] = m.into();
    }
    let req = api
        .call(Method::POST, "/v3/templates", Some(request))
        .await?;
    let tid = req["templateID"].as_str().unwrap_or_default().to_owned();
    let bid = req["buildID"].as_str().unwrap_or_default().to_owned();
    eprintln!("building template {} (ID {tid}, build {bid})", args.name);
    for p in &packed {
        let link = api
            .call(
                Method::GET,
                &format!("/templates/{tid}/files/{}", p.hash),
                None,
            )
            .await?;
        if let Some(url) = link.get("url").and_then(Value::as_str) {
            api.upload(url, p.archive.clone()).await?;
        }
    }
    let from = if let Some(image) = &image {
        let link = api
            .call(
                Method::GET,
                &format!("/templates/{tid}/files/{}", image.hash),
                None,
            )
            .await?;
        if let Some(url) = link.get("url").and_then(Value::as_str) {
            eprintln!("uploading {}", image.describe());
            api.upload_file(url, image.path()).await?;
        }
        json!({"fromImageArchive": image.hash})
    } else if api.template_exists(&recipe.from).await? {
        json!({"fromTemplate": recipe.from})
    } else {
        json!({"fromImage": recipe.from})
    };
    let mut start = json!({"steps": steps, "force": args.skip_cache});
    for (k, v) in from.as_object().into_iter().flatten() {
        start[k] = v.clone();
    }
    if let Some(cmd) = &recipe.start_cmd {
        // Without a ready command the snapshot is taken right after the start command starts.
        start["startCmd"] = cmd.clone().into();
        if let Some(ready) = &args.ready_cmd {
            start["readyCmd"] = ready.clone().into();
        }
    }
    api.call(
        Method::POST,
        &format!("/v2/templates/{tid}/builds/{bid}"),
        Some(start),
    )
    .await?;
    follow(api, &tid, &bid, recipe.steps.len(), &args.name).await
}

/// A local image to upload: a `docker save` or OCI layout tarball as it is, or an OCI layout
/// directory packed into a temporary tar; hashed for the files link.
struct ImageArchive {
    source: PathBuf,
    packed: Option<tempfile::NamedTempFile>,
    hash: String,
    len: u64,
}

impl ImageArchive {
    fn open(source: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(source)
            .with_context(|| format!("--image {}: not there", source.display()))?;
        let packed = if meta.is_dir() {
            if !source.join("index.json").is_file() {
                bail!(
                    "--image {}: a directory must be an OCI image layout (it has no index.json)",
                    source.display()
                );
            }
            let tmp = tempfile::NamedTempFile::new().context("create a temporary file")?;
            let mut tar = tar::Builder::new(tmp.reopen().context("open the temporary file")?);
            tar.follow_symlinks(false);
            tar.append_dir_all(".", source)
                .and_then(|()| tar.finish())
                .with_context(|| format!("pack {}", source.display()))?;
            Some(tmp)
        } else {
            None
        };
        let path = packed.as_ref().map_or(source, |t| t.path());
        let mut file =
            std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
        let mut h = Sha256::new();
        let len =
            std::io::copy(&mut file, &mut h).with_context(|| format!("read {}", path.display()))?;
        Ok(Self {
            source: source.to_owned(),
            packed,
            hash: hex::encode(h.finalize()),
            len,
        })
    }

    fn path(&self) -> &Path {
        self.packed.as_ref().map_or(&self.source, |t| t.path())
    }

    fn describe(&self) -> String {
        format!(
            "{} ({:.1} MiB)",
            self.source.display(),
            self.len as f64 / f64::from(1 << 20)
        )
    }
}

/// Polls the build's status to its end, showing its log.
async fn follow(
    api: &Api,
    tid: &str,
    bid: &str,
    total: usize,
    name: &str,
) -> anyhow::Result<ExitCode> {
    let shown = Shown::new(total);
    let mut offset = 0;
    loop {
        let path = format!("/templates/{tid}/builds/{bid}/status?logsOffset={offset}");
        let st = api.call(Method::GET, &path, None).await?;
        let entries = st["logEntries"].as_array().cloned().unwrap_or_default();
        offset += entries.len();
        for e in &entries {
            shown.line(e);
        }
        match st["status"].as_str() {
            Some("ready") if entries.is_empty() => {
                shown.finish();
                println!("{name}");
                return Ok(ExitCode::SUCCESS);
            }
            Some("error") if entries.is_empty() => {
                shown.finish();
                let reason = st["reason"]["message"]
                    .as_str()
                    .unwrap_or("the build failed");
                eprintln!("error: {reason}");
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
        if entries.is_empty() {
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_stays_inside_the_context_and_hashes_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app/a.txt"), "a").unwrap();
        let one = pack(dir.path(), "app").unwrap();
        assert_eq!(one.hash.len(), 64);
        assert_eq!(one.hash, pack(dir.path(), "app").unwrap().hash);
        std::fs::write(dir.path().join("app/a.txt"), "b").unwrap();
        assert_ne!(one.hash, pack(dir.path(), "app").unwrap().hash);
        // The archive holds `app/a.txt`, relative to the context.
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&one.archive[..]));
        let names: Vec<String> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.iter().any(|n| n == "app/a.txt"), "{names:?}");
        for bad in ["../x", "/etc", "app/*.txt", "missing"] {
            assert!(pack(dir.path(), bad).is_err(), "{bad}");
        }
    }
}
