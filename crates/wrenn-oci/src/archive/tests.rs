//! Archive reading against tarballs built here in memory: docker save (old and blob layouts),
//! OCI layouts (nested indexes, gzip layers), and hostile archives (bad digests, `..` names,
//! links, too many entries).

use std::io::Write;
use std::path::PathBuf;

use super::*;

/// A tar of these regular files, in this order.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A layer: a tar with one file.
fn layer(file: &str, content: &[u8]) -> Vec<u8> {
    tar_of(&[(file, content)])
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn hex_of(data: &[u8]) -> String {
    sha256_digest(data)["sha256:".len()..].to_owned()
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin", "GREETING=hi there"], "WorkingDir": "/app", "Cmd": ["/app/run"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes()
}

struct Fixture {
    _dir: tempfile::TempDir,
    archive: PathBuf,
    store: BlobStore,
    store_root: PathBuf,
}

fn fixture(bytes: &[u8]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let archive = dir.path().join("in/image.tar");
    std::fs::write(&archive, bytes).unwrap();
    let store_root = dir.path().join("store");
    Fixture {
        store: BlobStore::new(store_root.clone()),
        store_root,
        archive,
        _dir: dir,
    }
}

impl Fixture {
    fn read(&self) -> Result<Image, OciError> {
        read_archive(&self.archive, &self.store)
    }

    /// Every file under the store's `sha256/`, as (name, content).
    fn blobs(&self) -> Vec<(String, Vec<u8>)> {
        let Ok(dir) = std::fs::read_dir(self.store_root.join("sha256")) else {
            return Vec::new();
        };
        dir.map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
    }
}

#[test]
fn reads_an_old_style_docker_save() {
    let l1 = layer("etc/hello", b"hello");
    let l2 = layer("app/run", b"#!/bin/sh\necho hi\n");
    let ids = vec![sha256_digest(&l1), sha256_digest(&l2)];
    let config = config_json(&ids);
    let config_name = format!("{}.json", hex_of(&config));
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["wrenn/test:v1"],
        "Layers": ["aaaa/layer.tar", "./bbbb/layer.tar"],
    }])
    .to_string();
    // docker writes manifest.json last, layers before their manifest.
    let f = fixture(&tar_of(&[
        ("bbbb/layer.tar", &l2),
        ("aaaa/VERSION", b"1.0"),
        ("aaaa/layer.tar", &l1),
        (&config_name, &config),
        ("repositories", b"{}"),
        ("manifest.json", manifest.as_bytes()),
    ]));
    let image = f.read().unwrap();
    assert_eq!(image.reference, "wrenn/test:v1");
    let digests: Vec<_> = image.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(digests, ids);
    for (layer, data) in image.layers.iter().zip([&l1, &l2]) {
        assert_eq!(layer.compression, Compression::None);
        assert_eq!(layer.size, data.len() as u64);
        assert_eq!(&std::fs::read(&layer.path).unwrap(), data);
        assert_eq!(Some(layer.path.clone()), f.store.path(&layer.digest));
    }
    assert_eq!(image.config.working_dir.as_deref(), Some("/app"));
    assert_eq!(image.config.cmd, vec!["/app/run"]);
    assert!(
        image
            .config
            .env
            .contains(&("GREETING".into(), "hi there".into()))
    );
    // Content, not naming: the same blobs under other names and tags give the same digest.
    let config_digest = sha256_digest(&config);
    assert_eq!(image.digest, docker_digest(&config_digest, &image.layers));
    // Only the config and the layers went into the store, not VERSION or repositories.
    assert_eq!(f.blobs().len(), 3);
    // A second read reuses the blobs and gives the same image.
    assert_eq!(f.read().unwrap(), image);
}

#[test]
fn the_stores_size_cap_applies() {
    let (tar, _, layers) = layout(false);
    let mut f = fixture(&tar);
    let total: u64 = layers.iter().map(|l| l.len() as u64).sum();
    f.store = f.store.clone().with_max_image_bytes(total - 1);
    assert!(matches!(f.read().unwrap_err(), OciError::Limit { .. }));
    f.store = f.store.clone().with_max_image_bytes(total + 1000);
    f.read().unwrap();
}

#[test]
fn reads_a_docker_save_with_blob_names_and_gzip_layers() {
    let raw = layer("a", b"compressed");
    let gz = gzip(&raw);
    let config = config_json(&[sha256_digest(&raw)]);
    let config_name = format!("blobs/sha256/{}", hex_of(&config));
    let layer_name = format!("blobs/sha256/{}", hex_of(&gz));
    let manifest =
        serde_json::json!([{"Config": config_name, "RepoTags": null, "Layers": [layer_name]}])
            .to_string();
    let f = fixture(&tar_of(&[
        ("manifest.json", manifest.as_bytes()),
        (&layer_name, &gz),
        (&config_name, &config),
    ]));
    let image = f.read().unwrap();
    assert_eq!(image.layers[0].compression, Compression::Gzip);
    assert_eq!(image.layers[0].digest, sha256_digest(&gz));
    assert_eq!(image.reference, "image.tar");
}

/// An OCI layout: index.json → nested index (with an arm64 entry first) → manifest.
fn layout(tamper_layer: bool) -> (Vec<u8>, String, Vec<Vec<u8>>) {
    let l1 = gzip(&layer("etc/hello", b"hello"));
    let l2 = gzip(&layer("app/run", b"run"));
    let ids = vec![sha256_digest(b"unused-1"), sha256_digest(b"unused-2")];
    let config = config_json(&ids);
    let desc = |media: &str, data: &[u8]| serde_json::json!({"mediaType": media, "digest": sha256_digest(data), "size": data.len()});
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::image::OCI_MANIFEST,
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [
            desc("application/vnd.oci.image.layer.v1.tar+gzip", &l1),
            desc("application/vnd.oci.image.layer.v1.tar+gzip", &l2),
        ],
    })
    .to_string()
    .into_bytes();
    let mut amd64 = desc(crate::image::OCI_MANIFEST, &manifest);
    amd64["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let mut arm64 = desc(crate::image::OCI_MANIFEST, b"not here");
    arm64["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
    let nested = serde_json::json!({
        "schemaVersion": 2, "mediaType": crate::image::OCI_INDEX, "manifests": [arm64, amd64],
    })
    .to_string()
    .into_bytes();
    let mut top_entry = desc(crate::image::OCI_INDEX, &nested);
    top_entry["annotations"] =
        serde_json::json!({"io.containerd.image.name": "docker.io/wrenn/test:v1"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top_entry]}).to_string();
    let blob = |data: &[u8]| format!("blobs/sha256/{}", hex_of(data));
    let l2_stored = if tamper_layer {
        let mut bad = l2.clone();
        *bad.last_mut().unwrap() ^= 1;
        bad
    } else {
        l2.clone()
    };
    let tar = tar_of(&[
        (&blob(&l2), &l2_stored),
        (&blob(&l1), &l1),
        (&blob(&config), &config),
        (&blob(&manifest), &manifest),
        (&blob(&nested), &nested),
        ("index.json", index.as_bytes()),
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
    ]);
    (tar, sha256_digest(&manifest), vec![l1, l2])
}

#[test]
fn reads_an_oci_layout_through_nested_indexes() {
    let (tar, manifest_digest, layers) = layout(false);
    let f = fixture(&tar);
    let image = f.read().unwrap();
    assert_eq!(image.digest, manifest_digest);
    assert_eq!(image.reference, "docker.io/wrenn/test:v1");
    assert_eq!(image.layers.len(), 2);
    for (layer, data) in image.layers.iter().zip(&layers) {
        assert_eq!(layer.digest, sha256_digest(data));
        assert_eq!(layer.compression, Compression::Gzip);
        assert_eq!(&std::fs::read(&layer.path).unwrap(), data);
    }
    assert_eq!(image.config.env[0], ("PATH".into(), "/usr/bin".into()));
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let (tar, _, layers) = layout(true);
    let f = fixture(&tar);
    let err = f.read().unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    // The good layer may be in the store; the tampered one under no name at all.
    let bad_name = hex_of(&layers[1]);
    for (name, content) in f.blobs() {
        assert_ne!(name, bad_name);
        assert_eq!(name, hex_of(&content), "a blob stored under a wrong name");
    }

    // docker save: a layer that is not what the config's diff ID says.
    let l1 = layer("a", b"one");
    let config = config_json(&[sha256_digest(b"something else")]);
    let config_name = format!("{}.json", hex_of(&config));
    let manifest =
        serde_json::json!([{"Config": config_name, "Layers": ["x/layer.tar"]}]).to_string();
    let f = fixture(&tar_of(&[
        ("x/layer.tar", &l1),
        (&config_name, &config),
        ("manifest.json", manifest.as_bytes()),
    ]));
    let err = f.read().unwrap_err();
    assert!(err.to_string().contains("diff ID"), "{err}");

    // ... and a config that is not what its name says.
    let wrong_name = format!("{}.json", "0".repeat(64));
    let manifest = serde_json::json!([{"Config": wrong_name, "Layers": []}]).to_string();
    let f = fixture(&tar_of(&[
        (&wrong_name, &config_json(&[])),
        ("manifest.json", manifest.as_bytes()),
    ]));
    assert!(
        f.read()
            .unwrap_err()
            .to_string()
            .contains("digest mismatch")
    );
}

/// A raw header whose name the tar crate's builder would refuse (it rejects `..`).
fn raw_entry(tar: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

#[test]
fn dot_dot_and_link_entries_are_never_read_or_written() {
    let dir = tempfile::tempdir().unwrap();
    let evil = b"evil payload";
    let l1 = layer("a", b"one");
    let config = config_json(&[sha256_digest(&l1)]);
    let config_name = format!("{}.json", hex_of(&config));
    let manifest = serde_json::json!([{
        "Config": config_name, "Layers": ["ok/layer.tar"],
    }])
    .to_string();

    let mut tar = Vec::new();
    raw_entry(&mut tar, "../x", tar::EntryType::Regular, "", evil);
    raw_entry(
        &mut tar,
        "/tmp/wrenn-oci-evil",
        tar::EntryType::Regular,
        "",
        evil,
    );
    raw_entry(
        &mut tar,
        "link",
        tar::EntryType::Symlink,
        "/etc/passwd",
        b"",
    );
    let mut good = tar_of(&[
        ("ok/layer.tar", &l1),
        (&config_name, &config),
        ("manifest.json", manifest.as_bytes()),
    ]);
    tar.append(&mut good);
    let f = fixture(&tar);
    let image = f.read().unwrap();
    assert_eq!(image.layers.len(), 1);
    for (_, content) in f.blobs() {
        assert_ne!(content, evil);
    }
    assert!(!f.archive.parent().unwrap().join("../x").exists());
    assert!(!dir.path().join("x").exists());
    assert!(!Path::new("/tmp/wrenn-oci-evil").exists());

    // A manifest that names a link, or a `..` path, gets an error, not the link's target.
    for (layer_name, entry_name) in [("link", "link"), ("../x", "../x")] {
        let manifest =
            serde_json::json!([{"Config": config_name, "Layers": [layer_name]}]).to_string();
        let mut tar = Vec::new();
        raw_entry(
            &mut tar,
            entry_name,
            tar::EntryType::Symlink,
            "/etc/passwd",
            b"",
        );
        tar.append(&mut tar_of(&[
            (&config_name, &config),
            ("manifest.json", manifest.as_bytes()),
        ]));
        let err = fixture(&tar).read().unwrap_err();
        assert!(matches!(err, OciError::BadImage { .. }), "{err}");
    }
}

#[test]
fn malformed_archives_are_refused_clearly() {
    let cases: [(Vec<u8>, &str); 5] = [
        (tar_of(&[("manifest.json", b"[]")]), "lists no image"),
        (tar_of(&[("hello", b"x")]), "neither a docker save"),
        (gzip(&tar_of(&[("manifest.json", b"[]")])), "compressed"),
        (
            tar_of(&[("manifest.json", b"{")]),
            "not a docker save manifest",
        ),
        (
            tar_of(&[("manifest.json", b"[]"), ("manifest.json", b"[]")]),
            "twice",
        ),
    ];
    for (bytes, want) in cases {
        let err = fixture(&bytes).read().unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    let names: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("f{i}")).collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
    let err = fixture(&tar_of(&files)).read().unwrap_err();
    assert!(matches!(err, OciError::Limit { .. }), "{err}");
}
