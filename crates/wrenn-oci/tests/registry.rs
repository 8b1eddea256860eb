//! Pulls from a real registry (Debian's `docker-registry`, distribution 2.8) that the tests start
//! on 127.0.0.1, holding images that `skopeo` pushed from an OCI layout written here; and reads
//! skopeo's docker-archive and a tar of that layout. Skipped (with a note) when either tool is
//! missing; `.ci/install-deps.sh` installs both.

use std::io::Write;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use wrenn_oci::{
    BlobStore, Compression, Credentials, Image, OciError, PullPolicy, pull, read_archive,
};

/// `wrenn` / `s3cret`, bcrypt (what `htpasswd -Bbn wrenn s3cret` printed once).
const HTPASSWD: &str = "wrenn:$2y$05$jchOKntDA343B4GGeOlrMeA5Kgg7cOCYNI2gwpI2SiauE9z7POhaa\n";

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn tools(needed: &[&str]) -> bool {
    let missing: Vec<_> = needed.iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        eprintln!("skipped: {missing:?} not installed (.ci/install-deps.sh installs them)");
    }
    missing.is_empty()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A registry process of our own, killed when dropped (a failed assertion included).
struct Registry {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start(htpasswd: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let auth = match htpasswd {
            Some(lines) => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, lines).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: wrenn-test\n    path: {}\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let mut registry = Self { child, addr, dir };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&self.addr).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("registry exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "registry not up: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry keeps a blob's bytes (its filesystem driver's layout).
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skopeo(args: &[&str]) {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Deterministic bytes that do not compress, so a layer spans many network reads.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn tar_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data), &mut out).unwrap();
    out
}

/// An OCI image layout on disk with three names: `v1` (the amd64 image), `multi` (an index of
/// an arm64 and the amd64 image) and `armonly` (an index with only the arm64 one).
struct Layout {
    dir: PathBuf,
    /// The amd64 image's manifest digest.
    manifest: String,
    config: String,
    /// The layers as pushed: (gzip'd blob, the tar inside).
    layers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Layout {
    fn write(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        let put = |data: &[u8]| {
            let digest = sha256(data);
            let path = dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
            std::fs::write(path, data).unwrap();
            serde_json::json!({"digest": digest, "size": data.len()})
        };
        let raw = [
            tar_of(&[("etc/hello", b"hello from layer one\n", 0o644)]),
            tar_of(&[
                ("app/run.sh", b"#!/bin/sh\necho run\n", 0o755),
                ("app/blob.bin", &noise(3 << 20, 7), 0o644),
            ]),
        ];
        let layers: Vec<_> = raw.iter().map(|t| (gzip(t), t.clone())).collect();
        let layer_descs: Vec<_> = layers
            .iter()
            .map(|(gz, _)| {
                let mut d = put(gz);
                d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
                d
            })
            .collect();
        let diff_ids: Vec<_> = raw.iter().map(|t| sha256(t)).collect();
        let image = |arch: &str| {
            let config = serde_json::json!({
                "architecture": arch, "os": "linux",
                "config": {
                    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world"],
                    "WorkingDir": "/app", "User": "1000:1000",
                    "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["/app/run.sh"],
                },
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            })
            .to_string();
            let mut config_desc = put(config.as_bytes());
            config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": layer_descs,
            })
            .to_string();
            let mut desc = put(manifest.as_bytes());
            desc["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
            desc["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
            (desc, sha256(manifest.as_bytes()), sha256(config.as_bytes()))
        };
        let (amd64, manifest, config) = image("amd64");
        let (arm64, _, _) = image("arm64");
        let index = |entries: Vec<serde_json::Value>| {
            let body = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": entries,
            })
            .to_string();
            let mut d = put(body.as_bytes());
            d["mediaType"] = "application/vnd.oci.image.index.v1+json".into();
            d
        };
        let named = |mut d: serde_json::Value, name: &str| {
            d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
            d.as_object_mut().unwrap().remove("platform");
            d
        };
        let top = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                named(amd64.clone(), "v1"),
                named(index(vec![arm64.clone(), amd64]), "multi"),
                named(index(vec![arm64]), "armonly"),
            ],
        });
        std::fs::write(dir.join("index.json"), top.to_string()).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_owned(),
            manifest,
            config,
            layers,
        }
    }

    fn push(&self, registry: &Registry, name: &str, creds: Option<&str>) {
        let src = format!("oci:{}:{name}", self.dir.display());
        let dest = format!("docker://{}/wrenn/test:{name}", registry.addr);
        let mut args = vec!["copy", "--all", "--dest-tls-verify=false"];
        if let Some(creds) = creds {
            args.extend(["--dest-creds", creds]);
        }
        args.extend([src.as_str(), dest.as_str()]);
        skopeo(&args);
    }

    /// The checks every read of the amd64 image passes, whatever the layers' form.
    fn check_config(&self, image: &Image) {
        let c = &image.config;
        assert_eq!(
            c.env,
            vec![
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
                ("GREETING".into(), "hello world".into()),
            ]
        );
        assert_eq!(c.working_dir.as_deref(), Some("/app"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.entrypoint, vec!["/bin/sh", "-c"]);
        assert_eq!(c.cmd, vec!["/app/run.sh"]);
    }

    /// The pulled image is exactly the pushed one, its blobs in the store.
    fn check_pulled(&self, image: &Image, store: &BlobStore) {
        assert_eq!(image.digest, self.manifest);
        self.check_config(image);
        assert_eq!(image.layers.len(), 2);
        for (layer, (gz, _)) in image.layers.iter().zip(&self.layers) {
            assert_eq!(layer.digest, sha256(gz));
            assert_eq!(layer.size, gz.len() as u64);
            assert_eq!(layer.compression, Compression::Gzip);
            assert_eq!(Some(&layer.path), store.path(&layer.digest).as_ref());
            assert_eq!(&std::fs::read(&layer.path).unwrap(), gz);
        }
        let config = std::fs::read(store.path(&self.config).unwrap()).unwrap();
        assert_eq!(sha256(&config), self.config);
    }
}

struct Lines(Mutex<Vec<String>>);

impl Lines {
    fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn no_loopback() -> PullPolicy {
    PullPolicy::new(|ip: IpAddr| !ip.is_loopback())
}

fn insecure(registry: &Registry) -> PullPolicy {
    let mut policy = no_loopback();
    policy.insecure.push(registry.addr.clone());
    policy
}

/// The whole `source()` chain, for checking a cause is carried.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

#[tokio::test]
async fn pulls_from_a_real_registry() {
    if !tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(None);
    let layout = Layout::write(&tmp.path().join("layout"));
    for name in ["v1", "multi", "armonly"] {
        layout.push(&registry, name, None);
    }
    let store = BlobStore::new(tmp.path().join("store"));
    let policy = insecure(&registry);
    let lines = Lines::new();
    let progress = |l: String| lines.push(l);
    let reference = format!("{}/wrenn/test:v1", registry.addr);

    let started = Instant::now();
    let image = pull(&reference, None, &policy, &store, &progress)
        .await
        .unwrap();
    eprintln!("first pull: {:?}", started.elapsed());
    assert_eq!(image.reference, reference);
    layout.check_pulled(&image, &store);
    let first = lines.take();
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("pulling layer 1/2 sha256:")),
        "{first:?}"
    );
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("pulling layer 2/2") && l.ends_with("(3.0 MiB)")),
        "{first:?}"
    );

    // A second pull downloads no layer again: same files, reported present.
    let inodes: Vec<_> = image
        .layers
        .iter()
        .map(|l| l.path.metadata().unwrap().ino())
        .collect();
    let again = pull(&reference, None, &policy, &store, &progress)
        .await
        .unwrap();
    assert_eq!(again, image);
    let second = lines.take();
    assert_eq!(
        second
            .iter()
            .filter(|l| l.ends_with("already present"))
            .count(),
        2,
        "{second:?}"
    );
    assert!(
        !second.iter().any(|l| l.starts_with("pulling layer")),
        "{second:?}"
    );
    let inodes_again: Vec<_> = again
        .layers
        .iter()
        .map(|l| l.path.metadata().unwrap().ino())
        .collect();
    assert_eq!(inodes, inodes_again);

    // By digest, and through an index (which picks linux/amd64).
    let by_digest = format!("{}/wrenn/test@{}", registry.addr, layout.manifest);
    layout.check_pulled(
        &pull(&by_digest, None, &policy, &store, &progress)
            .await
            .unwrap(),
        &store,
    );
    let multi = format!("{}/wrenn/test:multi", registry.addr);
    layout.check_pulled(
        &pull(&multi, None, &policy, &store, &progress)
            .await
            .unwrap(),
        &store,
    );
    let arm = format!("{}/wrenn/test:armonly", registry.addr);
    let err = pull(&arm, None, &policy, &store, &progress)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no linux/amd64 image (it has linux/arm64)"),
        "{err}"
    );

    for missing in ["wrenn/test:nope", "wrenn/absent:v1"] {
        let r = format!("{}/{missing}", registry.addr);
        let err = pull(&r, None, &policy, &store, &progress)
            .await
            .unwrap_err();
        eprintln!("not found: {}", chain(&err));
        assert!(
            matches!(err, OciError::NotFound { .. }),
            "{missing}: {}",
            chain(&err)
        );
    }

    // Over the store's cap: refused before any blob is fetched.
    let small = tmp.path().join("small");
    let capped = BlobStore::new(small.clone()).with_max_image_bytes(1 << 20);
    let err = pull(&reference, None, &policy, &capped, &progress)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::Limit { .. }), "{}", chain(&err));
    assert!(!small.join("sha256").exists());

    // Not listed insecure: the loopback address is refused before any request.
    let err = pull(&reference, None, &no_loopback(), &store, &progress)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::Denied { .. }), "{}", chain(&err));
    let text = err.to_string();
    assert!(
        text.contains(&format!("registry {} resolves to 127.0.0.1", registry.addr)),
        "{text}"
    );
    assert!(
        text.contains(&format!("--insecure-registry {}", registry.addr)),
        "{text}"
    );
}

#[tokio::test]
async fn a_corrupted_blob_is_refused_and_never_stored() {
    if !tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(None);
    let layout = Layout::write(&tmp.path().join("layout"));
    layout.push(&registry, "v1", None);
    // The registry serves its files as they are: flip bytes, keep the length.
    let bad = sha256(&layout.layers[1].0);
    let file = registry.blob_file(&bad);
    let mut data = std::fs::read(&file).unwrap();
    data[1000] ^= 0xff;
    std::fs::write(&file, &data).unwrap();

    let store_root = tmp.path().join("store");
    let store = BlobStore::new(store_root.clone());
    let reference = format!("{}/wrenn/test:v1", registry.addr);
    let err = pull(&reference, None, &insecure(&registry), &store, &|_| {})
        .await
        .unwrap_err();
    eprintln!("corrupted: {}", chain(&err));
    assert!(matches!(err, OciError::BadImage { .. }), "{}", chain(&err));
    assert!(
        chain(&err).contains("digest mismatch") || chain(&err).contains("Digest"),
        "{}",
        chain(&err)
    );
    assert!(!store.path(&bad).unwrap().exists());
    assert_eq!(
        std::fs::read_dir(store_root.join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn an_unused_port_is_unreachable_at_once() {
    let port = free_port();
    let registry = format!("127.0.0.1:{port}");
    let store = BlobStore::new(tempfile::tempdir().unwrap().path().to_owned());
    // Insecure (plain HTTP) and not: either way nothing answers.
    let mut policy = PullPolicy::new(|_| true);
    for insecure in [true, false] {
        policy.insecure = if insecure {
            vec![registry.clone()]
        } else {
            vec![]
        };
        let started = Instant::now();
        let err = pull(
            &format!("{registry}/wrenn/test:v1"),
            None,
            &policy,
            &store,
            &|_| {},
        )
        .await
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        eprintln!("unreachable: {}", chain(&err));
        assert!(
            matches!(err, OciError::Unreachable { .. }),
            "{}",
            chain(&err)
        );
        assert!(err.to_string().contains(&registry), "{err}");
        assert!(
            chain(&err).to_lowercase().contains("refused"),
            "{}",
            chain(&err)
        );
    }
}

#[tokio::test]
async fn basic_auth() {
    if !tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(Some(HTPASSWD));
    let layout = Layout::write(&tmp.path().join("layout"));
    layout.push(&registry, "v1", Some("wrenn:s3cret"));
    let store = BlobStore::new(tmp.path().join("store"));
    let policy = insecure(&registry);
    let reference = format!("{}/wrenn/test:v1", registry.addr);
    let wrong = Credentials {
        username: "wrenn".into(),
        password: "nope".into(),
    };
    for creds in [None, Some(&wrong)] {
        let err = pull(&reference, creds, &policy, &store, &|_| {})
            .await
            .unwrap_err();
        eprintln!("unauthorized: {}", chain(&err));
        assert!(
            matches!(err, OciError::Unauthorized { .. }),
            "{}",
            chain(&err)
        );
    }
    let right = Credentials {
        username: "wrenn".into(),
        password: "s3cret".into(),
    };
    let image = pull(&reference, Some(&right), &policy, &store, &|_| {})
        .await
        .unwrap();
    layout.check_pulled(&image, &store);
}

#[test]
fn reads_skopeo_docker_archive_and_a_layout_tar() {
    if !tools(&["skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::write(&tmp.path().join("layout"));

    // skopeo's docker-archive stores layers uncompressed (`<diff id>.tar`, with `<id>/layer.tar`
    // links to them): other digests, the same tars inside.
    let archive = tmp.path().join("img.tar");
    let dest = format!("docker-archive:{}:wrenn/test:v1", archive.display());
    skopeo(&["copy", &format!("oci:{}:v1", layout.dir.display()), &dest]);
    let store = BlobStore::new(tmp.path().join("store"));
    let image = read_archive(&archive, &store).unwrap();
    assert_eq!(image.reference, "docker.io/wrenn/test:v1");
    layout.check_config(&image);
    assert_eq!(image.layers.len(), 2);
    for (layer, (gz, raw)) in image.layers.iter().zip(&layout.layers) {
        assert_eq!(layer.compression, Compression::None);
        assert_eq!(layer.digest, sha256(raw));
        let stored = std::fs::read(&layer.path).unwrap();
        assert_eq!(stored, gunzip(gz));
    }

    // A tar of the layout directory: the first name in index.json (v1), digests as pushed.
    let layout_tar = tmp.path().join("layout.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&layout_tar).unwrap());
    b.append_dir_all(".", &layout.dir).unwrap();
    b.into_inner().unwrap().sync_all().unwrap();
    let image = read_archive(&layout_tar, &store).unwrap();
    assert_eq!(image.reference, "v1");
    layout.check_pulled(&image, &store);
}
