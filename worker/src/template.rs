//! Template builds: boot a template once, wait until it is warm, checkpoint it, prove the
//! checkpoint restores, and measure whether restoring or booting cold makes fresh sandboxes more
//! cheaply.
//!
//! Checkpoint images are cached under the worker's state directory, keyed by a hash of
//! everything that shapes them: the template's settings, the rootfs identity, the entry script,
//! the runsc version and its flags. A build whose key is cached reuses the image and its
//! measurements.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{BundleError, BundleSpec, ENTRY_MOUNT};
use crate::config::{FillPolicy, Isolation, TemplateConfig, TemplateKind};
use crate::runsc::{Runsc, RunscError};
use crate::sandbox::{FillMethod, Sandbox, SandboxPlan, StartError};

/// The entry script of the built-in template kinds.
pub const ENTRY_SCRIPT: &str = include_str!("../entry/entry.py");

/// How many restores a build makes to prove its checkpoint, and how many of each kind of start
/// it measures.
const PROBES: usize = 3;

/// Why a template could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The rootfs directory is missing.
    #[error(
        "template {template}: rootfs {path} does not exist (run scripts/setup.sh, or set \
         SHARDBOX_ROOTFS)"
    )]
    NoRootfs {
        /// The template.
        template: String,
        /// The missing directory.
        path: PathBuf,
    },
    /// The bundle could not be written.
    #[error("template {template}: cannot write its bundle")]
    Bundle {
        /// The template.
        template: String,
        /// Why.
        #[source]
        source: BundleError,
    },
    /// The state directory could not be written.
    #[error("template {template}: cannot write {path}")]
    Io {
        /// The template.
        template: String,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The template did not boot to its ready line.
    #[error("template {template} did not become ready")]
    Boot {
        /// The template.
        template: String,
        /// Why, with the sandbox's stderr.
        #[source]
        source: StartError,
    },
    /// The checkpoint failed.
    #[error("template {template}: checkpoint failed")]
    Checkpoint {
        /// The template.
        template: String,
        /// Why.
        #[source]
        source: RunscError,
    },
    /// The checkpoint was written but a restore of it does not work.
    #[error("template {template}: its checkpoint cannot be restored")]
    Restore {
        /// The template.
        template: String,
        /// Why, with the sandbox's stderr.
        #[source]
        source: StartError,
    },
}

/// What a build found, kept beside the cached image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildReport {
    /// The cache key.
    pub key: String,
    /// How long the first boot to ready took.
    pub boot_ms: u64,
    /// Mean CPU milliseconds of a restore (to awake), over the probes.
    pub restore_cpu_ms: f64,
    /// Mean wall milliseconds of a restore.
    pub restore_wall_ms: f64,
    /// Mean CPU milliseconds of a cold boot, when measured.
    pub cold_cpu_ms: Option<f64>,
    /// Mean wall milliseconds of a cold boot, when measured.
    pub cold_wall_ms: Option<f64>,
    /// How the pool fills.
    pub fill: FillMethod,
}

/// A built template, ready to make sandboxes.
#[derive(Debug)]
pub struct Template {
    /// The template's name.
    pub name: String,
    /// Its configuration.
    pub config: TemplateConfig,
    /// What the last build measured (or the cached build's figures).
    pub report: BuildReport,
    /// Whether the image came from the cache.
    pub cached: bool,
    bundle: BundleSpec,
    image: PathBuf,
    ctx: Arc<BuildContext>,
}

/// What all templates of a worker share.
#[derive(Debug)]
pub struct BuildContext {
    /// The runsc driver.
    pub runsc: Runsc,
    /// runsc's version line.
    pub runsc_version: String,
    /// Worker state directory.
    pub state_dir: PathBuf,
    /// Cgroup path prefix of this worker's sandboxes.
    pub cgroup_prefix: String,
    /// Sandbox id prefix, unique to this worker process.
    pub id_prefix: String,
    /// Text that identifies the runsc flags in cache keys.
    pub runsc_flags: String,
    next_id: AtomicU64,
}

impl BuildContext {
    /// A context; `id_prefix` names this worker's sandboxes.
    pub fn new(
        runsc: Runsc,
        runsc_version: String,
        state_dir: PathBuf,
        cgroup_prefix: String,
        id_prefix: String,
        runsc_flags: String,
    ) -> Self {
        BuildContext {
            runsc,
            runsc_version,
            state_dir,
            cgroup_prefix,
            id_prefix,
            runsc_flags,
            next_id: AtomicU64::new(1),
        }
    }

    fn next_sandbox_id(&self, template: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        // runsc takes any unique prefix of a container id for the id, and refuses an id that
        // is also the prefix of another (`-1` while `-10` exists is "ambiguous"): a fixed-width
        // counter keeps the ids of one worker from being prefixes of each other.
        format!("{}-{template}-{n:09}", self.id_prefix)
    }

    /// Where the entry script lives on the host.
    pub fn entry_dir(&self) -> PathBuf {
        self.state_dir.join("entry")
    }
}

impl Template {
    /// Builds template `name`, or takes its image from the cache.
    ///
    /// # Errors
    /// [`BuildError`], with the sandbox's stderr where it failed to boot or restore.
    pub async fn build(
        name: &str,
        config: &TemplateConfig,
        ctx: Arc<BuildContext>,
    ) -> Result<Template, BuildError> {
        if !config.rootfs.is_dir() {
            return Err(BuildError::NoRootfs {
                template: name.into(),
                path: config.rootfs.clone(),
            });
        }
        let bundle = bundle_spec(config, &ctx.entry_dir());
        let key = cache_key(name, config, &bundle, &ctx);
        let image = ctx
            .state_dir
            .join("images")
            .join(format!("{name}-{}", &key[..16]));
        let io = |path: &Path| {
            let path = path.to_owned();
            let template = name.to_owned();
            move |source| BuildError::Io {
                template,
                path,
                source,
            }
        };
        let report_path = image.join("shardbox-build.json");
        let mut template = Template {
            name: name.into(),
            config: config.clone(),
            report: BuildReport {
                key: key.clone(),
                boot_ms: 0,
                restore_cpu_ms: 0.0,
                restore_wall_ms: 0.0,
                cold_cpu_ms: None,
                cold_wall_ms: None,
                fill: FillMethod::Restore,
            },
            cached: false,
            bundle,
            image: image.clone(),
            ctx,
        };
        if let Some(report) = std::fs::read(&report_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<BuildReport>(&b).ok())
            .filter(|r| r.key == key)
        {
            template.report = report;
            template.report.fill = choose_fill(config.pool.fill, &template.report);
            template.cached = true;
            tracing::info!(template = name, key = %&key[..16], fill = template.report.fill.as_str(),
                "template image cached");
            return Ok(template);
        }
        if image.exists() {
            std::fs::remove_dir_all(&image).map_err(io(&image))?;
        }
        std::fs::create_dir_all(&image).map_err(io(&image))?;

        // Boot cold, then checkpoint the warm process where it waits for its first frame.
        let began = Instant::now();
        let boot = template
            .start(FillMethod::Cold)
            .await
            .map_err(|source| BuildError::Boot {
                template: name.into(),
                source,
            })?;
        template.report.boot_ms = began.elapsed().as_millis() as u64;
        let (id, runsc) = (boot.id().to_owned(), template.ctx.runsc.clone());
        let checkpointed = runsc.checkpoint(&id, &image).await;
        boot.discard().await;
        checkpointed.map_err(|source| BuildError::Checkpoint {
            template: name.into(),
            source,
        })?;

        // Prove the image: every probe restore must wake and answer a second wake too.
        let mut restores = Vec::new();
        for _ in 0..PROBES {
            let mut sandbox = template
                .start(FillMethod::Restore)
                .await
                .map_err(|source| BuildError::Restore {
                    template: name.into(),
                    source,
                })?;
            let pinged = sandbox.ping(Duration::from_secs(10)).await;
            restores.push((sandbox.started_in(), sandbox.start_cpu()));
            let id = sandbox.id().to_owned();
            sandbox.discard().await;
            if let Err(what) = pinged {
                let source = StartError::NotReady {
                    id,
                    what,
                    stderr: String::new(),
                };
                return Err(BuildError::Restore {
                    template: name.into(),
                    source,
                });
            }
        }
        (
            template.report.restore_wall_ms,
            template.report.restore_cpu_ms,
        ) = means(&restores);
        if config.pool.fill != FillPolicy::Restore {
            let mut colds = Vec::new();
            for _ in 0..PROBES {
                let sandbox =
                    template
                        .start(FillMethod::Cold)
                        .await
                        .map_err(|source| BuildError::Boot {
                            template: name.into(),
                            source,
                        })?;
                colds.push((sandbox.started_in(), sandbox.start_cpu()));
                sandbox.discard().await;
            }
            let (wall, cpu) = means(&colds);
            template.report.cold_wall_ms = Some(wall);
            template.report.cold_cpu_ms = Some(cpu);
        }
        template.report.fill = choose_fill(config.pool.fill, &template.report);
        let text = serde_json::to_vec_pretty(&template.report).expect("report serializes");
        std::fs::write(&report_path, text).map_err(io(&report_path))?;
        tracing::info!(
            template = name,
            boot_ms = template.report.boot_ms,
            restore_cpu_ms = template.report.restore_cpu_ms,
            cold_cpu_ms = template.report.cold_cpu_ms,
            fill = template.report.fill.as_str(),
            "template built"
        );
        Ok(template)
    }

    /// The checkpoint image directory.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The template's bundle description.
    pub fn bundle(&self) -> &BundleSpec {
        &self.bundle
    }

    /// The worker state directory the template lives in.
    pub fn state_dir(&self) -> &Path {
        &self.ctx.state_dir
    }

    /// Starts one sandbox of this template by `method` and wakes it.
    ///
    /// # Errors
    /// [`StartError`].
    pub async fn start(&self, method: FillMethod) -> Result<Sandbox, StartError> {
        let id = self.ctx.next_sandbox_id(&self.name);
        let bundle = self.ctx.state_dir.join("sandboxes").join(&id);
        let cgroup = format!("{}/{id}", self.ctx.cgroup_prefix);
        self.bundle
            .write(&bundle, &format!("/{cgroup}"))
            .map_err(|err| StartError::NotReady {
                id: id.clone(),
                what: err.to_string(),
                stderr: String::new(),
            })?;
        let plan = SandboxPlan {
            runsc: &self.ctx.runsc,
            id,
            cgroup,
            bundle,
            image: (method == FillMethod::Restore).then(|| self.image.clone()),
            memory_bytes: self.config.sandbox_memory_mb() << 20,
            pids: self.config.sandbox_pids(),
            timeout: Duration::from_millis(self.config.ready_timeout_ms),
        };
        Sandbox::start(plan).await
    }
}

fn choose_fill(policy: FillPolicy, report: &BuildReport) -> FillMethod {
    match (policy, report.cold_cpu_ms) {
        (FillPolicy::Restore, _) => FillMethod::Restore,
        (FillPolicy::Cold, _) => FillMethod::Cold,
        (FillPolicy::Auto, Some(cold)) if cold < report.restore_cpu_ms => FillMethod::Cold,
        (FillPolicy::Auto, _) => FillMethod::Restore,
    }
}

fn means(samples: &[(Duration, Duration)]) -> (f64, f64) {
    let n = samples.len().max(1) as f64;
    let wall = samples.iter().map(|s| s.0.as_secs_f64() * 1e3).sum::<f64>() / n;
    let cpu = samples.iter().map(|s| s.1.as_secs_f64() * 1e3).sum::<f64>() / n;
    (wall, cpu)
}

/// The bundle of a template, with shardbox's entry script for the built-in kinds.
pub fn bundle_spec(config: &TemplateConfig, entry_dir: &Path) -> BundleSpec {
    let args = if config.entrypoint.is_empty() {
        let kind = match config.kind {
            TemplateKind::Python => "python",
            TemplateKind::Exec => "exec",
        };
        let mode = match config.isolation {
            Isolation::Sandbox => "sandbox",
            Isolation::Process => "process",
        };
        vec![
            "python3".into(),
            format!("{ENTRY_MOUNT}/entry.py"),
            kind.into(),
            mode.into(),
        ]
    } else {
        config.entrypoint.clone()
    };
    let mut env = config.env.clone();
    if !config.preload.is_empty() {
        env.insert("SHARDBOX_PRELOAD".into(), config.preload.join(","));
    }
    BundleSpec {
        rootfs: config.rootfs.clone(),
        args,
        env,
        workdir: config.workdir.clone(),
        uid: config.user.uid,
        gid: config.user.gid,
        entry_dir: entry_dir.to_owned(),
        memory_bytes: config.sandbox_memory_mb() << 20,
        pids: config.sandbox_pids(),
        supervisor: config.isolation == Isolation::Process,
    }
}

/// What identifies a rootfs build: its `.shardbox-id` file when it has one (scripts/setup.sh
/// writes it), else its path and the size and modification time of its package database.
pub fn rootfs_identity(rootfs: &Path) -> String {
    if let Ok(id) = std::fs::read_to_string(rootfs.join(".shardbox-id")) {
        return id.trim().to_owned();
    }
    let meta = std::fs::metadata(rootfs.join("var/lib/dpkg/status")).ok();
    let stamp = meta.map(|m| {
        use std::os::unix::fs::MetadataExt;
        format!("{}:{}", m.size(), m.mtime())
    });
    format!("{}|{}", rootfs.display(), stamp.unwrap_or_default())
}

fn cache_key(
    name: &str,
    config: &TemplateConfig,
    bundle: &BundleSpec,
    ctx: &BuildContext,
) -> String {
    let mut hash = Sha256::new();
    let parts = [
        name.to_owned(),
        format!("{bundle:?}"),
        rootfs_identity(&config.rootfs),
        ENTRY_SCRIPT.to_owned(),
        ctx.runsc_version.clone(),
        ctx.runsc_flags.clone(),
        config.ready_timeout_ms.to_string(),
    ];
    for part in parts {
        hash.update(part.len().to_le_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
