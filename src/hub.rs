//! Resolving `-m MODEL` to files on disk: a local path, or a Hugging Face repo id in the standard cache.
//!
//! Invariants:
//! - An existing path (directory or file) is returned as given, never looked up on the Hub.
//! - A repo id `owner/name[@revision]` (revision defaults to `main`) resolves to a snapshot directory
//!   of the standard Hugging Face cache, the one Python's `huggingface_hub` uses:
//!   `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//!   `~/.cache/huggingface/hub`; layout `models--{owner}--{name}/refs/{revision}` (a commit hash) and
//!   `snapshots/{hash}/`. Files downloaded by `huggingface-cli`/`hf` are reused and vice versa.
//! - A snapshot is returned only when complete: `config.json`, `tokenizer.json`, and either
//!   `model.safetensors` or `model.safetensors.index.json` plus every shard it names. Missing files are
//!   downloaded (with hf-hub's blocking API and progress bars) unless `HF_HUB_OFFLINE` is set; every
//!   file of one snapshot comes from one commit.
//! - When files are missing and cannot be fetched, the error names the repo, the cache directory, the
//!   missing files and the command that fetches them.
//! - Environment variables are read once, in [`resolve_model`]; the logic below takes them as values so
//!   tests never touch the process environment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

/// The model `tern` runs when no `-m` is given.
pub const DEFAULT_MODEL: &str = "microsoft/bitnet-b1.58-2B-4T";

/// Files a model snapshot needs besides its weights.
const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files fetched along with a download when the repo has them.
const OPTIONAL_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];
const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Resolves a `-m` argument: an existing local path is returned as is; a Hugging Face repo id
/// (`owner/name` or `owner/name@revision`) resolves to a complete snapshot in the local cache,
/// downloading missing files unless `HF_HUB_OFFLINE` is set.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let env = HubEnv::from_lookup(|name| std::env::var_os(name), std::env::home_dir());
    resolve_with(spec, &env, &download_missing)
}

/// A repo id with its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RepoSpec {
    /// `owner/name`.
    id: String,
    /// Branch, tag or commit hash; `main` when not given.
    revision: String,
}

impl RepoSpec {
    /// Parses `owner/name[@revision]`; `None` if `spec` is not a valid Hugging Face model repo id.
    fn parse(spec: &str) -> Option<RepoSpec> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) if !rev.is_empty() && !rev.contains(char::is_whitespace) => (id, rev),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let (owner, name) = id.split_once('/')?;
        (valid_repo_part(owner) && valid_repo_part(name)).then(|| RepoSpec {
            id: id.to_owned(),
            revision: revision.to_owned(),
        })
    }

    /// The repo's folder in the cache: `models--owner--name`.
    fn folder(&self) -> String {
        format!("models--{}", self.id.replace('/', "--"))
    }
}

/// Hugging Face's rules for each half of a repo id: 1-96 of `[A-Za-z0-9_.-]`, not starting or ending
/// with `-` or `.`, no `--` or `..`.
fn valid_repo_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 96
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !part.starts_with(['-', '.'])
        && !part.ends_with(['-', '.'])
        && !part.contains("--")
        && !part.contains("..")
}

/// The environment settings that matter here, taken as values.
#[derive(Debug, Clone, Default)]
struct HubEnv {
    /// The hub cache directory; `None` when neither the variables nor a home directory say where.
    cache_dir: Option<PathBuf>,
    /// `HF_HOME` or its default, where `huggingface-cli login` keeps the token.
    hf_home: Option<PathBuf>,
    /// `HF_HUB_OFFLINE` is set to a true value.
    offline: bool,
    /// `HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`).
    token: Option<String>,
    /// `HF_TOKEN_PATH`: where to read the token instead of `$HF_HOME/token`.
    token_path: Option<PathBuf>,
    /// `HF_ENDPOINT`: a Hub mirror.
    endpoint: Option<String>,
}

impl HubEnv {
    /// Builds the settings from a variable lookup (empty values count as unset) and the home directory.
    fn from_lookup(var: impl Fn(&str) -> Option<OsString>, home: Option<PathBuf>) -> HubEnv {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let get_string = |name: &str| get(name).and_then(|v| v.into_string().ok());
        let hf_home = get("HF_HOME").map(PathBuf::from).or_else(|| {
            get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".cache")))
                .map(|cache| cache.join("huggingface"))
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")));
        let offline = get_string("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        HubEnv {
            cache_dir,
            hf_home,
            offline,
            token: get_string("HF_TOKEN").or_else(|| get_string("HUGGING_FACE_HUB_TOKEN")),
            token_path: get("HF_TOKEN_PATH").map(PathBuf::from),
            endpoint: get_string("HF_ENDPOINT"),
        }
    }

    /// The access token: `HF_TOKEN`, else the file `huggingface-cli login` wrote.
    fn token(&self) -> Option<String> {
        if let Some(token) = &self.token {
            return Some(token.clone());
        }
        let path = self
            .token_path
            .clone()
            .or_else(|| self.hf_home.as_ref().map(|h| h.join("token")))?;
        let token = std::fs::read_to_string(path).ok()?;
        let token = token.trim();
        (!token.is_empty()).then(|| token.to_owned())
    }
}

/// Downloads the files `repo` lacks into `cache_dir` and returns the complete snapshot directory.
type Downloader<'a> = dyn Fn(&RepoSpec, &HubEnv, &Path) -> Result<PathBuf> + 'a;

/// [`resolve_model`] with the environment and the downloader passed in.
fn resolve_with(spec: &str, env: &HubEnv, download: &Downloader<'_>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some(repo) = RepoSpec::parse(spec) else {
        bail!(
            "model path {spec} does not exist (and it is not a Hugging Face repo id such as {DEFAULT_MODEL})"
        );
    };
    let cache_dir = env.cache_dir.as_deref().ok_or_else(|| {
        anyhow!(
            "{spec} is not a local path, and the Hugging Face cache cannot be located (no home \
             directory): set HF_HUB_CACHE or HF_HOME, or pass a local model directory with -m"
        )
    })?;

    let snapshot = find_snapshot(cache_dir, &repo);
    let missing = match &snapshot {
        Some(dir) => missing_files(dir)?,
        None => all_files_missing(),
    };
    if let (Some(dir), true) = (&snapshot, missing.is_empty()) {
        return Ok(dir.clone());
    }
    if env.offline {
        bail!(
            "{}",
            missing_message(
                &repo,
                cache_dir,
                &missing,
                "HF_HUB_OFFLINE is set, so nothing is downloaded"
            )
        );
    }
    tracing::info!(
        "downloading {} (missing: {}) into {}",
        repo.id,
        missing.join(", "),
        cache_dir.display()
    );
    download(&repo, env, cache_dir).map_err(|e| {
        // HTTP errors repeat their sources in their own text: show the outer context and the root cause.
        let reason = match e.chain().count() {
            1 => format!("the download failed: {e}"),
            _ => format!("the download failed: {e}: {}", e.root_cause()),
        };
        anyhow!("{}", missing_message(&repo, cache_dir, &missing, &reason))
    })
}

/// The snapshot directory `repo`'s revision points to, if the cache has one.
fn find_snapshot(cache_dir: &Path, repo: &RepoSpec) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(repo.folder());
    let is_commit =
        repo.revision.len() == 40 && repo.revision.bytes().all(|b| b.is_ascii_hexdigit());
    let commit = if is_commit {
        repo.revision.clone()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(&repo.revision))
            .ok()?
            .trim()
            .to_owned()
    };
    let snapshot = repo_dir.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

/// How the missing weights are listed when the snapshot says nothing about sharding.
const UNKNOWN_WEIGHTS: &str = "model.safetensors (or model.safetensors.index.json and its shards)";

fn all_files_missing() -> Vec<String> {
    let mut missing: Vec<String> = REQUIRED_FILES.iter().map(|f| f.to_string()).collect();
    missing.push(UNKNOWN_WEIGHTS.to_owned());
    missing
}

/// The required files `snapshot` lacks (a dangling blob link counts as missing).
fn missing_files(snapshot: &Path) -> Result<Vec<String>> {
    let mut missing: Vec<String> = REQUIRED_FILES
        .iter()
        .filter(|f| !snapshot.join(f).exists())
        .map(|f| f.to_string())
        .collect();
    if snapshot.join(SINGLE_WEIGHTS).exists() {
        return Ok(missing);
    }
    let index = snapshot.join(WEIGHTS_INDEX);
    if !index.exists() {
        missing.push(UNKNOWN_WEIGHTS.to_owned());
        return Ok(missing);
    }
    missing.extend(
        shard_names(&index)?
            .into_iter()
            .filter(|shard| !snapshot.join(shard).exists()),
    );
    Ok(missing)
}

/// The distinct shard files a `model.safetensors.index.json` names in its `weight_map`, sorted.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let bytes =
        std::fs::read(index).with_context(|| format!("{}: cannot read", index.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: invalid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| {
            anyhow!(
                "{}: field `weight_map` missing or not an object",
                index.display()
            )
        })?;
    let mut shards = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            anyhow!(
                "{}: field `weight_map.{tensor}` must be a file name",
                index.display()
            )
        })?;
        // A shard name is a file inside the snapshot, never a path out of it.
        if file.is_empty() || file.contains("..") || Path::new(file).is_absolute() {
            bail!(
                "{}: field `weight_map.{tensor}` is not a file name: {file:?}",
                index.display()
            );
        }
        shards.push(file.to_owned());
    }
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// The error text for files that are missing and were not fetched.
fn missing_message(repo: &RepoSpec, cache_dir: &Path, missing: &[String], reason: &str) -> String {
    let revision = if repo.revision == "main" {
        String::new()
    } else {
        format!(" --revision {}", repo.revision)
    };
    let args = format!(
        "download {}{revision} --include '*.json' '*.safetensors' '*.jinja' --cache-dir '{}'",
        repo.id,
        cache_dir.display()
    );
    format!(
        "{} is not a local path, so it was looked up as a Hugging Face repo: revision {} is not \
         complete in the cache {}: missing {}; {reason}.\n\
         Fetch it with:\n    huggingface-cli {args}\nor:\n    hf {args}\n\
         or pass a local model directory with -m",
        repo.id,
        repo.revision,
        cache_dir.display(),
        missing.join(", "),
    )
}

/// Downloads what `repo` needs with hf-hub's blocking API into `cache_dir` (hf-hub writes the standard
/// cache layout) and returns the snapshot. Files come from the commit the revision points to now;
/// those that snapshot already has are not fetched again.
fn download_missing(repo: &RepoSpec, env: &HubEnv, cache_dir: &Path) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};

    let cache = Cache::new(cache_dir.to_path_buf());
    // hf-hub reads the token next to the cache dir, which is wrong when HF_HUB_CACHE is set: pass it.
    let mut builder = ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .with_token(env.token());
    if let Some(endpoint) = &env.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .context("cannot start the Hugging Face client")?;
    let repo_at =
        |revision: &str| Repo::with_revision(repo.id.clone(), RepoType::Model, revision.to_owned());
    let info = api
        .repo(repo_at(&repo.revision))
        .info()
        .with_context(|| format!("cannot list the files of {}@{}", repo.id, repo.revision))?;
    let listed = |f: &str| info.siblings.iter().any(|s| s.rfilename == f);
    // Pin every file to one commit, so a push to the branch mid-download cannot mix versions.
    let pinned = api.repo(repo_at(&info.sha));
    let snapshot = cache_dir
        .join(repo.folder())
        .join("snapshots")
        .join(&info.sha);
    let fetch = |file: &str| -> Result<()> {
        if !snapshot.join(file).exists() {
            pinned
                .download(file)
                .with_context(|| format!("downloading {file} of {}", repo.id))?;
        }
        Ok(())
    };

    for file in REQUIRED_FILES {
        if !listed(file) {
            bail!("{}@{} has no {file}", repo.id, repo.revision);
        }
        fetch(file)?;
    }
    for file in OPTIONAL_FILES.into_iter().filter(|f| listed(f)) {
        fetch(file)?;
    }
    if listed(SINGLE_WEIGHTS) {
        fetch(SINGLE_WEIGHTS)?;
    } else if listed(WEIGHTS_INDEX) {
        fetch(WEIGHTS_INDEX)?;
        for shard in shard_names(&snapshot.join(WEIGHTS_INDEX))? {
            fetch(&shard)?;
        }
    } else {
        bail!(
            "{}@{} has neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX} (for a GGUF repo, download the \
             .gguf file and pass its path with -m)",
            repo.id,
            repo.revision
        );
    }
    // Point the requested revision at the commit, as huggingface_hub does.
    cache
        .repo(repo_at(&repo.revision))
        .create_ref(&info.sha)
        .with_context(|| {
            format!(
                "cannot write refs/{} in {}",
                repo.revision,
                cache_dir.display()
            )
        })?;

    let missing = missing_files(&snapshot)?;
    if !missing.is_empty() {
        bail!(
            "after downloading, {} still lacks {}",
            snapshot.display(),
            missing.join(", ")
        );
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    fn fixtures_dir() -> PathBuf {
        std::env::var_os("TERN_FIXTURES")
            .map(Into::into)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
    }

    fn env_of(vars: &[(&str, &str)], home: Option<&str>) -> HubEnv {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        HubEnv::from_lookup(|name| vars.get(name).cloned(), home.map(PathBuf::from))
    }

    fn offline_env(cache: &Path) -> HubEnv {
        env_of(
            &[
                ("HF_HUB_CACHE", cache.to_str().unwrap()),
                ("HF_HUB_OFFLINE", "1"),
            ],
            None,
        )
    }

    fn no_download(_: &RepoSpec, _: &HubEnv, _: &Path) -> Result<PathBuf> {
        panic!("must not download")
    }

    /// A cache in `root` with `owner/name` at `refs/{revision}` -> `snapshots/HASH` holding `files`
    /// (fixture files copied from tiny-packed; other names get placeholder content). Returns the
    /// snapshot directory.
    fn fake_cache_in(root: &Path, revision: &str, files: &[&str]) -> PathBuf {
        let repo = root.join("models--owner--name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(revision), format!("{HASH}\n")).unwrap();
        let snapshot = repo.join("snapshots").join(HASH);
        std::fs::create_dir_all(&snapshot).unwrap();
        for f in files {
            let src = fixtures_dir().join("tiny-packed").join(f);
            if src.exists() {
                std::fs::copy(src, snapshot.join(f)).unwrap();
            } else {
                std::fs::write(snapshot.join(f), "{}").unwrap();
            }
        }
        snapshot
    }

    fn fake_cache(revision: &str, files: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let cache = tempfile::tempdir().unwrap();
        let snapshot = fake_cache_in(cache.path(), revision, files);
        (cache, snapshot)
    }

    const COMPLETE: [&str; 5] = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors",
    ];

    #[test]
    fn parses_repo_ids() {
        let r = RepoSpec::parse("microsoft/bitnet-b1.58-2B-4T").unwrap();
        assert_eq!(
            (r.id.as_str(), r.revision.as_str()),
            ("microsoft/bitnet-b1.58-2B-4T", "main")
        );
        assert_eq!(r.folder(), "models--microsoft--bitnet-b1.58-2B-4T");
        let r = RepoSpec::parse("a/b@v1.0").unwrap();
        assert_eq!(r.revision, "v1.0");
        for bad in [
            "gpt2",
            "a/b/c",
            "/abs/path",
            "./rel/x",
            "a/",
            "/b",
            "a/b@",
            "a/-b",
            "a/b.",
            "a/b--c",
            "a/b..c",
            "a b/c",
            "~/models/x",
            "C:\\models",
        ] {
            assert_eq!(RepoSpec::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn cache_dir_precedence() {
        let cache = |vars: &[(&str, &str)], home| env_of(vars, home).cache_dir;
        let all = [
            ("HF_HUB_CACHE", "/hub"),
            ("HF_HOME", "/home-hf"),
            ("XDG_CACHE_HOME", "/xdg"),
        ];
        assert_eq!(cache(&all, Some("/u")), Some("/hub".into()));
        assert_eq!(cache(&all[1..], Some("/u")), Some("/home-hf/hub".into()));
        assert_eq!(
            cache(&all[2..], Some("/u")),
            Some("/xdg/huggingface/hub".into())
        );
        assert_eq!(
            cache(&[], Some("/u")),
            Some("/u/.cache/huggingface/hub".into())
        );
        assert_eq!(cache(&[], None), None);
        // Empty values count as unset.
        assert_eq!(
            cache(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/h")], None),
            Some("/h/hub".into())
        );
        assert_eq!(
            cache(
                &[("HUGGINGFACE_HUB_CACHE", "/legacy"), ("HF_HOME", "/h")],
                None
            ),
            Some("/legacy".into())
        );
        // The token lives in HF_HOME even when HF_HUB_CACHE moves the cache.
        let e = env_of(&[("HF_HUB_CACHE", "/hub"), ("HF_HOME", "/h")], None);
        assert_eq!(e.hf_home, Some("/h".into()));
    }

    #[test]
    fn offline_and_token_settings() {
        for (v, off) in [
            ("1", true),
            ("TRUE", true),
            ("yes", true),
            ("0", false),
            ("", false),
        ] {
            assert_eq!(env_of(&[("HF_HUB_OFFLINE", v)], None).offline, off, "{v:?}");
        }
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_file\n").unwrap();
        let h = home.path().to_str().unwrap();
        assert_eq!(
            env_of(&[("HF_HOME", h)], None).token(),
            Some("hf_file".into())
        );
        assert_eq!(
            env_of(&[("HF_HOME", h), ("HF_TOKEN", "hf_env")], None).token(),
            Some("hf_env".into())
        );
        assert_eq!(env_of(&[], None).token(), None);
    }

    #[test]
    fn existing_paths_are_returned_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        let env = HubEnv::default();
        for p in [dir.path(), file.as_path()] {
            assert_eq!(
                resolve_with(p.to_str().unwrap(), &env, &no_download).unwrap(),
                p
            );
        }
    }

    #[test]
    fn nonexistent_local_path_is_an_error() {
        let env = HubEnv::default();
        for spec in ["/no/such/dir", "./missing-model", "model.gguf"] {
            let err = format!("{:#}", resolve_with(spec, &env, &no_download).unwrap_err());
            assert!(
                err.contains(spec) && err.contains("does not exist"),
                "{err}"
            );
        }
    }

    #[test]
    fn complete_snapshot_resolves_without_download() {
        let (cache, snapshot) = fake_cache("main", &COMPLETE);
        let env = offline_env(cache.path());
        assert_eq!(
            resolve_with("owner/name", &env, &no_download).unwrap(),
            snapshot
        );
        // Online too: nothing is missing, so nothing is downloaded.
        let env = env_of(&[("HF_HUB_CACHE", cache.path().to_str().unwrap())], None);
        assert_eq!(
            resolve_with("owner/name", &env, &no_download).unwrap(),
            snapshot
        );
        // The snapshot is a usable model directory.
        let tok = crate::tokenizer::Tokenizer::from_dir(&snapshot).unwrap();
        assert_eq!(tok.bos_id(), Some(1008));
        // HF_HOME layout: $HF_HOME/hub.
        let home = tempfile::tempdir().unwrap();
        let snapshot = fake_cache_in(&home.path().join("hub"), "main", &COMPLETE);
        let env = env_of(&[("HF_HOME", home.path().to_str().unwrap())], None);
        assert_eq!(
            resolve_with("owner/name", &env, &no_download).unwrap(),
            snapshot
        );
    }

    #[test]
    fn revisions_and_commit_hashes() {
        let (cache, snapshot) = fake_cache("v1", &COMPLETE);
        let env = offline_env(cache.path());
        assert_eq!(
            resolve_with("owner/name@v1", &env, &no_download).unwrap(),
            snapshot
        );
        let at_hash = format!("owner/name@{HASH}");
        assert_eq!(
            resolve_with(&at_hash, &env, &no_download).unwrap(),
            snapshot
        );
        // refs/main does not exist: nothing cached for main.
        let err = format!(
            "{:#}",
            resolve_with("owner/name", &env, &no_download).unwrap_err()
        );
        assert!(
            err.contains("missing config.json, tokenizer.json, model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn offline_error_names_repo_cache_files_and_command() {
        let (cache, _) = fake_cache("main", &["config.json", "model.safetensors"]);
        let env = offline_env(cache.path());
        let err = format!(
            "{:#}",
            resolve_with("owner/name@main", &env, &no_download).unwrap_err()
        );
        let dir = cache.path().display().to_string();
        for needle in [
            "owner/name",
            dir.as_str(),
            "missing tokenizer.json;",
            "HF_HUB_OFFLINE",
            &format!(
                "huggingface-cli download owner/name --include '*.json' '*.safetensors' '*.jinja' --cache-dir '{dir}'"
            ),
            "hf download owner/name",
            "-m",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
        // A non-default revision is part of the command.
        let (cache, _) = fake_cache("dev", &["config.json"]);
        let env = offline_env(cache.path());
        let err = format!(
            "{:#}",
            resolve_with("owner/name@dev", &env, &no_download).unwrap_err()
        );
        assert!(err.contains("download owner/name --revision dev"), "{err}");
    }

    #[test]
    fn sharded_index_with_missing_shard() {
        let index = r#"{"metadata": {}, "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00001-of-00002.safetensors"}}"#;
        let (cache, snapshot) = fake_cache(
            "main",
            &[
                "config.json",
                "tokenizer.json",
                "model-00001-of-00002.safetensors",
            ],
        );
        std::fs::write(snapshot.join(WEIGHTS_INDEX), index).unwrap();
        let env = offline_env(cache.path());
        let err = format!(
            "{:#}",
            resolve_with("owner/name", &env, &no_download).unwrap_err()
        );
        assert!(
            err.contains("missing model-00002-of-00002.safetensors;"),
            "{err}"
        );
        std::fs::write(snapshot.join("model-00002-of-00002.safetensors"), "x").unwrap();
        assert_eq!(
            resolve_with("owner/name", &env, &no_download).unwrap(),
            snapshot
        );
        // A malformed index names the file and field.
        std::fs::write(snapshot.join(WEIGHTS_INDEX), r#"{"weight_map": {"a": 3}}"#).unwrap();
        let err = format!(
            "{:#}",
            resolve_with("owner/name", &env, &no_download).unwrap_err()
        );
        assert!(
            err.contains(WEIGHTS_INDEX) && err.contains("weight_map.a"),
            "{err}"
        );
        std::fs::write(
            snapshot.join(WEIGHTS_INDEX),
            r#"{"weight_map": {"a": "../x"}}"#,
        )
        .unwrap();
        assert!(resolve_with("owner/name", &env, &no_download).is_err());
    }

    #[test]
    fn dangling_blob_link_counts_as_missing() {
        let (cache, snapshot) = fake_cache("main", &["config.json", "tokenizer.json"]);
        #[cfg(unix)]
        std::os::unix::fs::symlink("../../blobs/gone", snapshot.join(SINGLE_WEIGHTS)).unwrap();
        let env = offline_env(cache.path());
        let err = format!(
            "{:#}",
            resolve_with("owner/name", &env, &no_download).unwrap_err()
        );
        assert!(err.contains("missing model.safetensors"), "{err}");
    }

    #[test]
    fn download_is_used_online_and_failures_explain() {
        let (cache, snapshot) = fake_cache("main", &["config.json"]);
        let env = env_of(&[("HF_HUB_CACHE", cache.path().to_str().unwrap())], None);
        let failing = |_: &RepoSpec, _: &HubEnv, _: &Path| -> Result<PathBuf> {
            Err(anyhow!("network unreachable"))
        };
        let err = format!(
            "{:#}",
            resolve_with("owner/name", &env, &failing).unwrap_err()
        );
        for needle in [
            "network unreachable",
            "missing tokenizer.json, model.safetensors",
            "huggingface-cli download owner/name",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
        let completing = |repo: &RepoSpec, _: &HubEnv, dir: &Path| -> Result<PathBuf> {
            assert_eq!(repo.id, "owner/name");
            assert_eq!(dir, cache.path());
            for f in ["tokenizer.json", "model.safetensors"] {
                std::fs::write(snapshot.join(f), "{}").unwrap();
            }
            Ok(snapshot.clone())
        };
        assert_eq!(
            resolve_with("owner/name", &env, &completing).unwrap(),
            snapshot
        );
    }

    #[test]
    fn no_cache_location_is_an_error() {
        let err = format!(
            "{:#}",
            resolve_with("owner/name", &HubEnv::default(), &no_download).unwrap_err()
        );
        assert!(err.contains("HF_HUB_CACHE"), "{err}");
    }
}
