//! Dockerfile parsing for Hearth template builds.
//!
//! [`parse`] turns Dockerfile text into a [`Dockerfile`]: stages with typed instructions whose
//! arguments have had Docker's quote removal and variable substitution applied, so values reach
//! the template builder byte-for-byte as Docker (BuildKit) would produce them. Every instruction
//! or flag that Hearth cannot honour is rejected with its line number instead of being skipped.
//!
//! [`plan_copy`] and [`plan_add`] resolve the sources of a COPY or ADD in a build context
//! directory into a list of files, directories, symlinks and archives and where each goes in
//! the guest. [`IgnoreMatcher`] applies `.dockerignore` rules to that context.

mod archive;
mod copy_plan;
mod glob;
mod ignore;
mod lines;
mod parse;
mod unix_path;
mod words;

use std::collections::BTreeMap;

pub use archive::Compression;
pub use copy_plan::{plan_add, plan_copy, CopyEntry, CopyError, CopyPlan, EntryKind};
pub use ignore::{IgnoreError, IgnoreMatcher};

/// An error in a Dockerfile, with the 1-based line where the instruction starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {instruction}: {message}")]
pub struct ParseError {
    pub line: usize,
    /// The instruction keyword in upper case (`RUN`), or `# syntax` / `# escape` for directives.
    pub instruction: String,
    pub message: String,
}

/// A parsed Dockerfile. The last stage is the one whose result becomes the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub stages: Vec<Stage>,
}

/// One build stage, from a FROM instruction up to the next FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The lower-cased name from `FROM image AS name`.
    pub name: Option<String>,
    pub base: StageBase,
    /// Line of the FROM instruction.
    pub line: usize,
    /// The stage's instructions in order. ARG instructions are not listed: their values appear
    /// in variable substitution and in [`InstructionKind::Run`]'s `env`.
    pub instructions: Vec<Instruction>,
}

/// The starting point of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageBase {
    /// An image reference, after ARG substitution (`debian:12`, `ghcr.io/org/img@sha256:...`).
    Image(String),
    /// An earlier stage of this Dockerfile, by index into [`Dockerfile::stages`].
    Stage(usize),
    /// `FROM scratch`: an empty filesystem.
    Scratch,
}

/// An instruction and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub line: usize,
    pub kind: InstructionKind,
}

/// A supported instruction with its arguments processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    /// A command for the build VM. `env` contains the build arguments in scope, in declaration
    /// order, that RUN receives as environment variables: those with a value and not overridden by
    /// an ENV of the same name.
    Run { command: Command, env: Vec<(String, String)> },
    /// COPY (`add == false`) or ADD. Sources and dest are substituted but not resolved; pass
    /// them with `workdir` to [`plan_copy`] or [`plan_add`] when `from` is `None`.
    Copy {
        sources: Vec<String>,
        dest: String,
        from: Option<CopyFrom>,
        chown: Option<String>,
        chmod: Option<u32>,
        add: bool,
        /// The absolute working directory in effect for this instruction.
        workdir: String,
    },
    /// Variables in order, after substitution and quote removal.
    Env(Vec<(String, String)>),
    /// The new absolute working directory, already resolved against the previous one.
    Workdir(String),
    User(String),
    Cmd(Command),
    Entrypoint(Command),
    /// Port specs as written after substitution: `80`, `53/udp`, `8000-8010/tcp`.
    Expose(Vec<String>),
    Label(Vec<(String, String)>),
    Shell(Vec<String>),
}

/// A command in shell form (run by the stage's SHELL, `/bin/sh -c` by default) or exec form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The text exactly as written, continuations joined; the shell does the substitution.
    Shell(String),
    Exec(Vec<String>),
}

/// The source of `COPY --from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFrom {
    /// An earlier stage, by index into [`Dockerfile::stages`].
    Stage(usize),
    /// An image reference.
    Image(String),
}

/// The parts of a base image's configuration that stages built on it inherit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BaseImageConfig {
    /// The image's environment (`Config.Env`), in order.
    pub env: Vec<(String, String)>,
    /// The image's working directory (`Config.WorkingDir`); empty means `/`.
    pub working_dir: String,
}

/// Parses `text` with no knowledge of base images: every base image is taken to have an empty
/// working directory and only Docker's default `PATH`, so `ENV PATH=/x:$PATH` substitutes that
/// default. Use [`parse_with_base_images`] when image configurations are known.
pub fn parse(text: &str, build_args: &BTreeMap<String, String>) -> Result<Dockerfile, ParseError> {
    let mut no_config = |_: &str| Ok(BaseImageConfig::default());
    parse_with_base_images(text, build_args, &mut no_config)
}

/// Parses `text`, asking `base_config` for the configuration of each base image (after ARG
/// substitution, never for `scratch` or a stage). An `Err` from it fails the parse with that
/// message on the FROM line.
pub fn parse_with_base_images(
    text: &str,
    build_args: &BTreeMap<String, String>,
    base_config: &mut dyn FnMut(&str) -> Result<BaseImageConfig, String>,
) -> Result<Dockerfile, ParseError> {
    parse::parse_dockerfile(text, build_args, base_config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn parse_then_plan_copy_from_context() {
        let context = tempfile::tempdir().unwrap();
        fs::create_dir_all(context.path().join("app/__pycache__")).unwrap();
        fs::write(context.path().join("app/main.py"), "print('hi')\n").unwrap();
        fs::write(context.path().join("app/__pycache__/main.pyc"), "bytecode").unwrap();
        fs::write(context.path().join("requirements.txt"), "requests\n").unwrap();
        let ignore = IgnoreMatcher::parse("**/__pycache__\n");

        let text = "\
# syntax=docker/dockerfile:1
ARG PY=3.12
FROM python:${PY}-slim AS base
ARG APP_HOME=/srv/app
ENV APP_HOME=$APP_HOME \\
    GREETING=\"hello \\\"world\\\"\"
WORKDIR $APP_HOME
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY --chown=1000:1000 app/ ./app
USER 1000
CMD [\"python\", \"app/main.py\"]
";
        let dockerfile = parse(text, &BTreeMap::from([("PY".to_string(), "3.11".to_string())])).unwrap();
        let stage = &dockerfile.stages[0];
        assert_eq!(stage.base, StageBase::Image("python:3.11-slim".into()));
        assert_eq!(stage.line, 3);

        let env = &stage.instructions[0];
        assert_eq!(env.line, 5);
        assert_eq!(
            env.kind,
            InstructionKind::Env(vec![
                ("APP_HOME".into(), "/srv/app".into()),
                ("GREETING".into(), "hello \"world\"".into()),
            ])
        );

        let mut planned = Vec::new();
        for instruction in &stage.instructions {
            if let InstructionKind::Copy { sources, dest, workdir, from: None, add: false, .. } = &instruction.kind {
                let plan = plan_copy(context.path(), sources, dest, workdir, &ignore).unwrap();
                planned.extend(plan.entries.into_iter().map(|entry| (entry.guest_path, entry.kind)));
            }
        }
        assert_eq!(
            planned,
            vec![
                ("/srv/app/requirements.txt".to_string(), EntryKind::File),
                ("/srv/app/app".to_string(), EntryKind::Dir),
                ("/srv/app/app/main.py".to_string(), EntryKind::File),
            ]
        );

        let last = stage.instructions.last().unwrap();
        assert_eq!(last.kind, InstructionKind::Cmd(Command::Exec(vec!["python".into(), "app/main.py".into()])));
        assert_eq!(last.line, 12);
    }

    #[test]
    fn arg_with_empty_name_is_rejected() {
        let err = parse("FROM a\nARG =x\n", &BTreeMap::new()).unwrap_err();
        assert_eq!(err.to_string(), "line 2: ARG: ARG name is empty in \"=x\"");
        let err = parse("FROM a\nARG\n", &BTreeMap::new()).unwrap_err();
        assert_eq!(err.to_string(), "line 2: ARG: ARG requires at least one argument");
    }
}
