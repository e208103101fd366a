//! Template builds on this node: the control plane's [`TemplateBuilder`], carried out by
//! the template builder crate with this node's VMM driver and a network slot from its pool.
//!
//! Builds run one at a time: they share the layer cache, and a build VM under TCG keeps a
//! core busy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hearth_control_plane::builds::{
    BuildFailure, BuildLog, BuildOutput, BuildSource, BuildSpec, LogLevel, TemplateBuilder, ARCHIVE_IMAGE_PREFIX,
};
use hearth_oci::RegistryAuth;
use hearth_storage::{DataDir, TemplateBuildPaths, TemplateManifest};
use hearth_template_builder::base_disk::{self, BaseDiskSettings};
use hearth_template_builder::custom::{
    build_custom_template, BootArtifacts, BuildPlan, CustomBuildError, CustomBuildOptions, LogKind, ReadyCheck,
    StartSpec, StepRef,
};
use hearth_template_builder::plan::{self, SdkStep};
use hearth_vmm::MachineSize;

use crate::NodeAgent;

/// Settings of template builds on this node.
#[derive(Clone, Debug)]
pub struct BuildSettings {
    /// Static envd installed into every template.
    pub envd_binary: PathBuf,
    /// Apparent size of a template's root disk.
    pub disk_size_bytes: u64,
    /// Registries reached over plain HTTP besides loopback ones.
    pub plain_http_registries: Vec<String>,
    /// Maximum time a single build step may run.
    pub step_timeout: Duration,
    /// Maximum time the ready check may take to pass.
    pub ready_timeout: Duration,
    /// Maximum time for the build VM's boots until envd responds, over all attempts.
    pub boot_timeout: Duration,
}

impl BuildSettings {
    /// Defaults: an 8 GiB disk, one hour per step, two minutes to become ready, and 90 s
    /// for the build VM's boots. That is three attempts of 30 s, and a healthy boot under
    /// TCG takes about 3.5 s.
    pub fn new(envd_binary: impl Into<PathBuf>) -> Self {
        Self {
            envd_binary: envd_binary.into(),
            disk_size_bytes: 8 << 30,
            plain_http_registries: Vec::new(),
            step_timeout: Duration::from_secs(3600),
            ready_timeout: Duration::from_secs(120),
            boot_timeout: Duration::from_secs(90),
        }
    }
}

/// Builds templates with a [`NodeAgent`]'s driver and slots.
pub struct NodeTemplateBuilder {
    agent: Arc<NodeAgent>,
    settings: BuildSettings,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl NodeTemplateBuilder {
    pub fn new(agent: Arc<NodeAgent>, settings: BuildSettings) -> Self {
        Self { agent, settings, one_at_a_time: tokio::sync::Mutex::new(()) }
    }

    fn data_dir(&self) -> &DataDir {
        &self.agent.config().data_dir
    }

    fn base_settings(&self) -> BaseDiskSettings {
        BaseDiskSettings {
            data_dir: self.data_dir().clone(),
            envd_binary: self.settings.envd_binary.clone(),
            hostname: "e2b".into(),
            disk_size_bytes: self.settings.disk_size_bytes,
            plain_http_registries: self.settings.plain_http_registries.clone(),
        }
    }

    async fn run(&self, spec: BuildSpec, log: Arc<dyn BuildLog>) -> Result<BuildOutput, CustomBuildError> {
        let base_fail = |message: String| CustomBuildError::new(StepRef::Base, message);
        let emit = {
            let log = log.clone();
            move |step: &StepRef, kind: LogKind, line: &str| {
                let level = match kind {
                    LogKind::Info | LogKind::Output => LogLevel::Info,
                    LogKind::Warn => LogLevel::Warn,
                    LogKind::Error => LogLevel::Error,
                };
                log.append(level, Some(&step.to_string()), line);
            }
        };
        let (base_id, base_build) = spec
            .base_template
            .clone()
            .ok_or_else(|| base_fail("the base template has no ready build; run `hearth template build-base`".into()))?;
        let base_dir = self.data_dir().template_build(&base_id, &base_build).dir().to_owned();
        let boot = boot_artifacts(&base_dir).map_err(base_fail)?;
        let settings = self.base_settings();
        let work_dir = self.data_dir().cache_dir().join("build-work").join(spec.build_id.as_str());
        let _ = tokio::fs::remove_dir_all(&work_dir).await;
        std::fs::create_dir_all(&work_dir).map_err(|err| base_fail(format!("failed to create {}: {err}", work_dir.display())))?;

        let options = CustomBuildOptions {
            data_dir: self.data_dir().clone(),
            template_id: spec.template_id.clone(),
            build_id: spec.build_id.clone(),
            machine: MachineSize { vcpus: spec.vcpus, memory_mib: spec.memory_mib },
            envd_version: hearth_types::ENVD_VERSION.to_owned(),
            boot,
            force: spec.force,
            step_timeout: self.settings.step_timeout,
            ready_timeout: self.settings.ready_timeout,
            start_settle: Duration::from_secs(2),
            boot_timeout: self.settings.boot_timeout,
        };
        let progress = |line: &str| emit(&StepRef::Base, LogKind::Info, line);
        let slot = self
            .agent
            .slots()
            .acquire()
            .await
            .map_err(|err| base_fail(format!("no network slot for the build VM: {err}")))?;

        let result = async {
            let plan = match &spec.source {
                BuildSource::Image { reference, .. } if reference.starts_with(ARCHIVE_IMAGE_PREFIX) => {
                    let hash = &reference[ARCHIVE_IMAGE_PREFIX.len()..];
                    let archive = spec.files_dir.join(hash);
                    progress(&format!("reading the image archive {hash}"));
                    let unpacked = work_dir.join("image-archive");
                    let image = hearth_oci::read_docker_archive(&archive, &unpacked, None)
                        .map_err(|err| base_fail(format!("the uploaded image archive is not usable: {err}")))?;
                    let (base, _config) = base_disk::from_image(&settings, reference, image, &progress)
                        .await
                        .map_err(|err| base_fail(err.to_string()))?;
                    self.sdk_plan(&spec, base, &work_dir)?
                }
                BuildSource::Image { reference, credentials } => {
                    let auth = match credentials {
                        Some(c) => RegistryAuth::Basic { username: c.username.clone(), password: c.password.clone() },
                        None => RegistryAuth::Anonymous,
                    };
                    let (base, _config) = base_disk::from_registry(&settings, reference, &auth, &progress)
                        .await
                        .map_err(|err| base_fail(err.to_string()))?;
                    self.sdk_plan(&spec, base, &work_dir)?
                }
                BuildSource::Template { template_id, build_id } => {
                    let dir = self.data_dir().template_build(template_id, build_id);
                    progress(&format!("starting from template {template_id} build {build_id}"));
                    let base = base_disk::from_template(&settings, dir.dir()).await.map_err(|err| base_fail(err.to_string()))?;
                    self.sdk_plan(&spec, base, &work_dir)?
                }
                BuildSource::Dockerfile { text, context_hash } => {
                    let context = match context_hash {
                        Some(hash) => Some(spec.files_dir.join(hash)),
                        None => None,
                    };
                    let request = plan::DockerfileRequest {
                        text,
                        context_archive: context.as_deref(),
                        work_dir: &work_dir,
                        start_cmd: spec.start_cmd.as_deref(),
                        ready_cmd: spec.ready_cmd.as_deref(),
                        base_build_dir: &base_dir,
                    };
                    plan::dockerfile_plan(&request, &settings, &options, self.agent.driver(), &slot, &emit).await?
                }
            };
            build_custom_template(&options, &plan, self.agent.driver(), &slot, &emit).await
        }
        .await;
        if let Err(err) = self.agent.slots().release(slot).await {
            tracing::error!(build_id = %spec.build_id, error = %err, "failed to release the build's network slot");
        }
        let _ = tokio::fs::remove_dir_all(&work_dir).await;
        let built = result?;
        Ok(BuildOutput {
            envd_version: built.manifest.envd_version.clone(),
            vcpus: built.manifest.vcpus,
            memory_mib: built.manifest.memory_mib,
            disk_mb: built.manifest.disk_size_bytes >> 20,
        })
    }

    fn sdk_plan(
        &self,
        spec: &BuildSpec,
        base: hearth_template_builder::custom::BaseDisk,
        work_dir: &Path,
    ) -> Result<BuildPlan, CustomBuildError> {
        let steps: Vec<SdkStep> = spec
            .steps
            .iter()
            .map(|step| SdkStep {
                kind: step.kind.clone(),
                args: step.args.clone(),
                files_hash: step.files_hash.clone(),
                force: step.force,
            })
            .collect();
        let plan_steps = plan::sdk_steps(&steps, base.defaults(), &spec.files_dir, work_dir)?;
        let start = spec.start_cmd.as_ref().filter(|cmd| !cmd.trim().is_empty()).map(|command| StartSpec {
            command: command.clone(),
            ready: spec.ready_cmd.clone().filter(|cmd| !cmd.trim().is_empty()).map(ReadyCheck::Command),
        });
        let ready_only = match start {
            Some(_) => None,
            None => spec.ready_cmd.clone().filter(|cmd| !cmd.trim().is_empty()).map(ReadyCheck::Command),
        };
        Ok(BuildPlan {
            exposed_ports: base.defaults().exposed_ports.clone(),
            labels: base.defaults().labels.clone(),
            base,
            steps: plan_steps,
            start,
            ready_only,
        })
    }
}

/// Kernel and initramfs of the base template's ready build, which every build VM boots.
fn boot_artifacts(base_dir: &Path) -> Result<BootArtifacts, String> {
    let paths = TemplateBuildPaths::new(base_dir);
    let manifest = TemplateManifest::load(&paths.manifest())
        .map_err(|err| format!("the base template build {} is not usable: {err}", base_dir.display()))?;
    Ok(BootArtifacts {
        kernel: paths.kernel(),
        initrd: paths.initrd(),
        kernel_release: manifest.kernel_release,
        cmdline: manifest.kernel_cmdline,
    })
}

#[async_trait]
impl TemplateBuilder for NodeTemplateBuilder {
    async fn build(&self, spec: BuildSpec, log: Arc<dyn BuildLog>) -> Result<BuildOutput, BuildFailure> {
        let _turn = self.one_at_a_time.lock().await;
        let template_id = spec.template_id.clone();
        let build_id = spec.build_id.clone();
        tracing::info!(template_id = %template_id, build_id = %build_id, "template build started");
        match self.run(spec, log.clone()).await {
            Ok(output) => {
                tracing::info!(template_id = %template_id, build_id = %build_id, "template build ready");
                Ok(output)
            }
            Err(err) => {
                let step = err.step.to_string();
                log.append(LogLevel::Error, Some(&step), &err.message);
                Err(BuildFailure { message: err.message, step: Some(step) })
            }
        }
    }
}
