//! Pulling an image from a registry with `oci-client`: the address check before any request,
//! anonymous or basic credentials (bearer-token challenges are oci-client's), the manifest (an
//! index resolved to linux/amd64), then the config and the layers streamed into the store.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::image::{
    Descriptor, MANIFEST_TYPES, Manifest, check_digest, human, layer_compression, parse_config,
    parse_manifest, select_platform, sha256_digest, short,
};
use crate::store::sniff_file;
use crate::{BlobStore, Cause, Image, Layer, MAX_METADATA_BYTES, OciError};

/// How long a connection to a registry (or a name look-up) may take before it is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a registry may stay silent mid-answer before the transfer fails.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Indexes pointing at indexes are allowed this deep, no deeper.
const MAX_INDEX_DEPTH: usize = 3;

/// A registry login (what the E2B SDK sends as `fromImageRegistry`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where a host may pull from.
#[derive(Clone)]
pub struct PullPolicy {
    /// Registries (`host[:port]`, exactly as the reference names them) spoken to over plain HTTP
    /// and exempt from the address check: the operator's explicit list.
    pub insecure: Vec<String>,
    /// Whether the host may pull from an address; every address a registry's name resolves to
    /// must pass (an IPv4-mapped IPv6 address is asked as its IPv4 address).
    pub allow_address: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
}

impl PullPolicy {
    /// A policy with no insecure registries.
    pub fn new(allow_address: impl Fn(IpAddr) -> bool + Send + Sync + 'static) -> Self {
        Self {
            insecure: Vec::new(),
            allow_address: Arc::new(allow_address),
        }
    }
}

impl std::fmt::Debug for PullPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullPolicy")
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

/// Pulls `reference` (Docker defaults: `ubuntu` is `docker.io/library/ubuntu:latest`) into
/// `store`, reporting what it does as lines to `progress`. An index picks linux/amd64. Blobs the
/// store holds already are not downloaded again; an image larger than the store's
/// [`BlobStore::max_image_bytes`] is refused before any layer is.
pub async fn pull(
    reference: &str,
    creds: Option<&Credentials>,
    policy: &PullPolicy,
    store: &BlobStore,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Image, OciError> {
    let remote = Remote::connect(parse_reference(reference)?, creds, policy).await?;
    progress(format!("resolving {}", remote.name));
    let (digest, config, layers) = remote.manifest().await?;
    check_total(&config, &layers, store.max_image_bytes())?;
    let compressions = layers
        .iter()
        .map(layer_compression)
        .collect::<Result<Vec<_>, _>>()?;

    let config_path = remote.blob(&config, store).await?;
    let config_bytes =
        std::fs::read(&config_path).map_err(OciError::io("reading", &config_path))?;
    let parsed = parse_config(&config_bytes, layers.len())?;

    let mut out = Vec::with_capacity(layers.len());
    for (i, (layer, compression)) in layers.iter().zip(compressions).enumerate() {
        let what = format!(
            "layer {}/{} {} ({})",
            i + 1,
            layers.len(),
            short(&layer.digest),
            human(layer.size)
        );
        let path = match store.existing(&layer.digest, layer.size) {
            Some(path) => {
                progress(format!("{what} already present"));
                path
            }
            None => {
                progress(format!("pulling {what}"));
                remote.blob(layer, store).await?
            }
        };
        let sniffed = sniff_file(&path)?;
        if sniffed != compression {
            return Err(OciError::bad(format!(
                "{what} is {sniffed:?} by its first bytes but {compression:?} by its media type"
            )));
        }
        out.push(Layer {
            digest: layer.digest.clone(),
            path,
            size: layer.size,
            compression,
        });
    }
    progress(format!("pulled {} ({})", remote.name, short(&digest)));
    Ok(Image {
        digest,
        reference: remote.name,
        config: parsed.config,
        layers: out,
    })
}

/// Parses a reference the way Docker does (default registry `docker.io`, `library/` for
/// single-name repositories, tag `latest`).
pub(crate) fn parse_reference(reference: &str) -> Result<Reference, OciError> {
    reference
        .parse::<Reference>()
        .map_err(|e| OciError::BadReference {
            reference: reference.to_owned(),
            source: e.into(),
        })
}

/// Refuses a registry whose name resolves to an address the policy denies, before any request,
/// unless the operator listed it as insecure.
///
/// Only the registry's own name is checked, once, here: a redirect (registries backed by object
/// storage send blob downloads elsewhere), a bearer-token realm on another host, and a name that
/// answers differently when reqwest resolves it again to connect are not; oci-client's HTTP
/// client follows and resolves those itself.
pub(crate) async fn check_registry(registry: &str, policy: &PullPolicy) -> Result<(), OciError> {
    if policy.insecure.iter().any(|r| r == registry) {
        return Ok(());
    }
    let unreachable = |source: Cause| OciError::Unreachable {
        registry: registry.to_owned(),
        source,
    };
    let (host, port) = host_port(registry);
    let addrs = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::lookup_host((host, port.unwrap_or(443))),
    )
    .await
    .map_err(|e| unreachable(format!("resolving {host}: {e}").into()))?
    .map_err(|e| unreachable(e.into()))?
    .collect::<Vec<_>>();
    if addrs.is_empty() {
        return Err(unreachable(format!("{host} has no addresses").into()));
    }
    for addr in addrs {
        let ip = addr.ip().to_canonical();
        if !(policy.allow_address)(ip) {
            return Err(OciError::Denied {
                registry: registry.to_owned(),
                address: ip,
            });
        }
    }
    Ok(())
}

/// Splits `host[:port]` (an IPv6 host in brackets).
fn host_port(registry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = registry.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (registry, None),
    }
}

/// The sum of an image's blob sizes, against the cap.
fn check_total(config: &Descriptor, layers: &[Descriptor], max: u64) -> Result<(), OciError> {
    let total = layers
        .iter()
        .try_fold(config.size, |sum, l| sum.checked_add(l.size));
    match total {
        Some(total) if total <= max => Ok(()),
        total => Err(OciError::Limit {
            what: format!(
                "{} in {} layers (at most {})",
                total.map_or_else(|| "more than 16 EiB".to_owned(), human),
                layers.len(),
                human(max)
            ),
        }),
    }
}

/// A registry we passed the address check for and authenticated to.
struct Remote {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    /// `host[:port]` as requests go to it.
    registry: String,
    /// The normalised reference.
    name: String,
}

impl Remote {
    async fn connect(
        reference: Reference,
        creds: Option<&Credentials>,
        policy: &PullPolicy,
    ) -> Result<Self, OciError> {
        let registry = reference.resolve_registry().to_owned();
        check_registry(&registry, policy).await?;
        // reqwest 0.13 (under oci-client) is built without a bundled crypto provider (that would
        // be aws-lc, a C build); ring is the process default unless something installed another.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(policy.insecure.clone()),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            user_agent: concat!("wrenn-oci/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        // `Client::new` would fall back to a default client (HTTPS everywhere, no timeouts) on
        // an error; `try_from` reports it.
        let client = Client::try_from(config).map_err(|e| OciError::Registry {
            registry: registry.clone(),
            source: e.into(),
        })?;
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let remote = Self {
            client,
            name: reference.whole(),
            reference,
            auth,
            registry,
        };
        // The first request (`/v2/`, then a token realm if the registry challenges): its errors
        // are the registry's reachability and the credentials, surfaced here rather than as an
        // anonymous 401 later (oci-client drops token errors on the lazy path).
        remote
            .client
            .auth(&remote.reference, &remote.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| remote.error(e))?;
        Ok(remote)
    }

    /// The image manifest's digest, config and layers, through indexes if need be.
    async fn manifest(&self) -> Result<(String, Descriptor, Vec<Descriptor>), OciError> {
        let mut target = self.reference.clone();
        for _ in 0..MAX_INDEX_DEPTH {
            // oci-client reads the whole answer before we see it, so the size cap is checked
            // after the fact (as are its token answers and error bodies, which it reads whole).
            let (body, _) = self
                .client
                .pull_manifest_raw(&target, &self.auth, MANIFEST_TYPES)
                .await
                .map_err(|e| self.error(e))?;
            if body.len() as u64 > MAX_METADATA_BYTES {
                return Err(OciError::Limit {
                    what: format!("manifest of {} bytes", body.len()),
                });
            }
            let digest = sha256_digest(&body);
            if let Some(want) = target.digest()
                && want != digest
            {
                return Err(OciError::bad(format!(
                    "digest mismatch: manifest {want} is {digest}"
                )));
            }
            match parse_manifest(&body, &format!("manifest {}", short(&digest)))? {
                Manifest::Image { config, layers } => return Ok((digest, config, layers)),
                Manifest::Index(entries) => {
                    let entry = select_platform(&entries, &format!("index {}", short(&digest)))?;
                    check_digest(&entry.digest, "an index entry")?;
                    target = self.reference.clone_with_digest(entry.digest.clone());
                }
            }
        }
        Err(OciError::bad(format!(
            "indexes nested more than {MAX_INDEX_DEPTH} deep"
        )))
    }

    /// Streams a blob into the store (or finds it there), verified against its descriptor.
    async fn blob(
        &self,
        desc: &Descriptor,
        store: &BlobStore,
    ) -> Result<std::path::PathBuf, OciError> {
        check_digest(&desc.digest, "a blob")?;
        if let Some(path) = store.existing(&desc.digest, desc.size) {
            return Ok(path);
        }
        // By digest alone: a descriptor's `urls` (foreign layers) would send oci-client to hosts
        // nobody checked.
        let sized = self
            .client
            .pull_blob_stream(&self.reference, desc.digest.as_str())
            .await
            .map_err(|e| self.error(e))?;
        if let Some(len) = sized.content_length
            && len != desc.size
        {
            return Err(OciError::bad(format!(
                "blob {} is {len} bytes, its descriptor says {}",
                short(&desc.digest),
                desc.size
            )));
        }
        let (registry, digest) = (self.registry.clone(), desc.digest.clone());
        let fail = move |e: std::io::Error| transfer_error(&registry, &digest, e);
        store
            .put_stream(sized.stream, &desc.digest, desc.size, &fail)
            .await
    }

    /// Sorts oci-client's errors into ours.
    fn error(&self, e: OciDistributionError) -> OciError {
        let registry = self.registry.clone();
        match classify(&e) {
            Kind::Unreachable => OciError::Unreachable {
                registry,
                source: e.into(),
            },
            Kind::Unauthorized => OciError::Unauthorized {
                registry,
                source: e.into(),
            },
            Kind::NotFound => OciError::NotFound {
                reference: self.name.clone(),
                source: e.into(),
            },
            Kind::BadImage => OciError::bad_because("the registry's answer", e),
            Kind::Other => OciError::Registry {
                registry,
                source: e.into(),
            },
        }
    }
}

enum Kind {
    Unreachable,
    Unauthorized,
    NotFound,
    BadImage,
    Other,
}

fn classify(e: &OciDistributionError) -> Kind {
    use OciDistributionError as E;
    match e {
        E::RequestError(r) if r.is_connect() || r.is_timeout() => Kind::Unreachable,
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => Kind::Unauthorized,
        E::RegistryError { envelope, .. } => {
            let codes = || envelope.errors.iter().map(|e| &e.code);
            if codes().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                Kind::NotFound
            } else if codes()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Kind::Unauthorized
            } else {
                Kind::Other
            }
        }
        E::ServerError { code: 404, .. } => Kind::NotFound,
        E::ServerError {
            code: 401 | 403, ..
        } => Kind::Unauthorized,
        E::DigestError(_)
        | E::ManifestParsingError(_)
        | E::VersionedParsingError(_)
        | E::UnsupportedMediaTypeError(_)
        | E::UnsupportedSchemaVersionError(_) => Kind::BadImage,
        _ => Kind::Other,
    }
}

/// A blob stream's error: oci-client's own digest check (it verifies too, as the stream ends),
/// or a transfer that broke off.
fn transfer_error(registry: &str, digest: &str, e: std::io::Error) -> OciError {
    let mismatch = e
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<DigestError>().is_some());
    if mismatch {
        OciError::bad_because(format!("digest mismatch: blob {}", short(digest)), e)
    } else {
        OciError::Registry {
            registry: registry.to_owned(),
            source: e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_take_docker_defaults() {
        let cases = [
            (
                "ubuntu",
                "docker.io/library/ubuntu:latest",
                "index.docker.io",
            ),
            (
                "ubuntu:22.04",
                "docker.io/library/ubuntu:22.04",
                "index.docker.io",
            ),
            (
                "e2bdev/base",
                "docker.io/e2bdev/base:latest",
                "index.docker.io",
            ),
            ("ghcr.io/o/r:v1", "ghcr.io/o/r:v1", "ghcr.io"),
            (
                "127.0.0.1:5000/wrenn/test:v1",
                "127.0.0.1:5000/wrenn/test:v1",
                "127.0.0.1:5000",
            ),
            (
                "localhost:5000/x",
                "localhost:5000/x:latest",
                "localhost:5000",
            ),
        ];
        for (given, whole, registry) in cases {
            let r = parse_reference(given).unwrap();
            assert_eq!(r.whole(), whole, "{given}");
            assert_eq!(r.resolve_registry(), registry, "{given}");
        }
        let pinned = format!("alpine@sha256:{}", "a".repeat(64));
        assert_eq!(
            parse_reference(&pinned).unwrap().digest(),
            Some(&pinned["alpine@".len()..])
        );
        for bad in ["", "x/UPPER", "a:b:c", "x@sha256:short", "ubuntu:bad tag"] {
            assert!(
                matches!(parse_reference(bad), Err(OciError::BadReference { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn host_and_port() {
        assert_eq!(host_port("r.io"), ("r.io", None));
        assert_eq!(host_port("10.0.0.1:5000"), ("10.0.0.1", Some(5000)));
        assert_eq!(host_port("[::1]:5000"), ("::1", Some(5000)));
        assert_eq!(host_port("[::1]"), ("::1", None));
    }

    fn no_loopback() -> PullPolicy {
        PullPolicy::new(|ip: IpAddr| !ip.is_loopback())
    }

    #[tokio::test]
    async fn address_check_denies_unless_listed_insecure() {
        let mut policy = no_loopback();
        let err = check_registry("127.0.0.1:5000", &policy).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "registry 127.0.0.1:5000 resolves to 127.0.0.1, an address this host does not pull \
             from (private, loopback or link-local); an operator can allow it with \
             --insecure-registry 127.0.0.1:5000"
        );
        // A v4-mapped v6 literal is judged as its v4 address.
        let err = check_registry("[::ffff:127.0.0.1]:5000", &policy)
            .await
            .unwrap_err();
        assert!(
            matches!(err, OciError::Denied { address, .. } if address == IpAddr::from([127, 0, 0, 1])),
            "{err}"
        );
        assert!(check_registry("[::1]:5000", &policy).await.is_err());
        policy.insecure.push("127.0.0.1:5000".into());
        check_registry("127.0.0.1:5000", &policy).await.unwrap();
        // Only the listed host and port.
        assert!(check_registry("127.0.0.1:5001", &policy).await.is_err());
        let open = PullPolicy::new(|_| true);
        check_registry("127.0.0.1:5000", &open).await.unwrap();
    }

    #[tokio::test]
    async fn pull_checks_the_address_before_any_request() {
        // Nothing listens on port 1; a denied registry never gets as far as finding that out.
        let store = BlobStore::new(tempfile::tempdir().unwrap().path().to_owned());
        let err = pull("127.0.0.1:1/x:v1", None, &no_loopback(), &store, &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, OciError::Denied { .. }), "{err}");
        let mut policy = no_loopback();
        policy.insecure.push("127.0.0.1:1".into());
        let err = pull("127.0.0.1:1/x:v1", None, &policy, &store, &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, OciError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    }

    #[test]
    fn pull_is_send() {
        fn send<T: Send>(_: &T) {}
        let store = BlobStore::new("/nonexistent".into());
        let policy = PullPolicy::new(|_| true);
        send(&pull("x", None, &policy, &store, &|_| {}));
    }

    #[test]
    fn totals_are_capped() {
        let d = |size| Descriptor {
            media_type: None,
            digest: String::new(),
            size,
            platform: None,
            annotations: Default::default(),
        };
        assert!(check_total(&d(1), &[d(2), d(3)], 6).is_ok());
        assert!(matches!(
            check_total(&d(1), &[d(2), d(4)], 6),
            Err(OciError::Limit { .. })
        ));
        assert!(check_total(&d(1), &[d(u64::MAX)], u64::MAX).is_err());
    }

    #[test]
    fn credentials_do_not_print_the_password() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
