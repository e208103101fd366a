//! Instruction parsing: turns logical lines into stages and typed instructions, tracking ARG,
//! ENV and WORKDIR state per stage the way BuildKit's Dockerfile frontend does.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

use crate::lines::{split_lines, LogicalLine};
use crate::unix_path;
use crate::words::{extract_flags, split_words, ExpandError, Expander};
use crate::{BaseImageConfig, Command, CopyFrom, Dockerfile, Instruction, InstructionKind, ParseError, Stage, StageBase};

/// Docker's `PATH` for images whose configuration sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The only platform Hearth builds for.
const PLATFORM: &str = "linux/amd64";

/// Build arguments that BuildKit defines for every build. They need an ARG instruction to be
/// visible inside a stage, but FROM lines can use them directly.
const PLATFORM_ARGS: [(&str, &str); 8] = [
    ("TARGETPLATFORM", PLATFORM),
    ("TARGETOS", "linux"),
    ("TARGETARCH", "amd64"),
    ("TARGETVARIANT", ""),
    ("BUILDPLATFORM", PLATFORM),
    ("BUILDOS", "linux"),
    ("BUILDARCH", "amd64"),
    ("BUILDVARIANT", ""),
];

/// Build arguments passed to RUN when given, even without an ARG instruction (Docker's
/// predefined proxy arguments).
const PREDEFINED_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

static STAGE_NAME: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[a-z][a-z0-9\-_.]*$").expect("valid regex"));
static HEREDOC: LazyLock<Regex> = LazyLock::new(|| Regex::new(r#"^[0-9]*<<-?['"]?[A-Za-z0-9_]"#).expect("valid regex"));
static PORT_SPEC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([0-9]+)(-([0-9]+))?(/(tcp|udp|sctp))?$").expect("valid regex"));
static URL_SCHEME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z][A-Za-z0-9+.\-]*://").expect("valid regex"));

pub(crate) fn parse_dockerfile(
    text: &str,
    build_args: &BTreeMap<String, String>,
    base_config: &mut dyn FnMut(&str) -> Result<BaseImageConfig, String>,
) -> Result<Dockerfile, ParseError> {
    let split = split_lines(text)?;
    let total_lines = text.lines().count().max(1);
    if split.lines.is_empty() {
        return Err(ParseError {
            line: total_lines,
            instruction: "FROM".into(),
            message: "the Dockerfile is empty: it must contain at least a FROM instruction".into(),
        });
    }

    let mut parser = Parser {
        escape: split.escape,
        build_args,
        base_config,
        declared_stage_names: declared_stage_names(&split.lines),
        meta_args: Vec::new(),
        stages: Vec::new(),
        finished: Vec::new(),
        current: None,
    };
    for line in &split.lines {
        parser.parse_line(line)?;
    }
    parser.finish_stage();

    if parser.stages.is_empty() {
        return Err(ParseError {
            line: total_lines,
            instruction: "FROM".into(),
            message: "the Dockerfile has no FROM instruction".into(),
        });
    }
    Ok(Dockerfile { stages: parser.stages })
}

/// Collects the `AS` name of every FROM line in order, lower-cased, before parsing, so that a
/// reference to a later stage is distinguished from an image name.
fn declared_stage_names(lines: &[LogicalLine]) -> Vec<Option<String>> {
    lines
        .iter()
        .filter_map(|line| {
            let (keyword, rest) = split_keyword(&line.text);
            if !keyword.eq_ignore_ascii_case("FROM") {
                return None;
            }
            let (args, _) = extract_flags(rest);
            let words: Vec<&str> = args.split_whitespace().collect();
            Some(match words.as_slice() {
                [_, as_keyword, name] if as_keyword.eq_ignore_ascii_case("as") => Some(name.to_ascii_lowercase()),
                _ => None,
            })
        })
        .collect()
}

fn split_keyword(text: &str) -> (&str, &str) {
    let text = text.trim();
    match text.find(|ch: char| ch.is_ascii_whitespace()) {
        Some(at) => (&text[..at], text[at..].trim_start()),
        None => (text, ""),
    }
}

/// The state a stage builds up as its instructions are read.
struct StageState {
    /// ENV variables, starting with the base image's, in order of first definition.
    env: Vec<(String, String)>,
    /// Build arguments declared in this stage; `None` for an ARG with no value.
    args: Vec<(String, Option<String>)>,
    workdir: String,
}

impl StageState {
    fn lookup(&self, name: &str) -> Option<String> {
        if let Some((_, value)) = self.env.iter().find(|(key, _)| key == name) {
            return Some(value.clone());
        }
        self.args.iter().find(|(key, _)| key == name).and_then(|(_, value)| value.clone())
    }

    fn set_env(&mut self, name: String, value: String) {
        match self.env.iter_mut().find(|(key, _)| *key == name) {
            Some(entry) => entry.1 = value,
            None => self.env.push((name, value)),
        }
    }
}

fn set_arg(args: &mut Vec<(String, Option<String>)>, name: String, value: Option<String>) {
    match args.iter_mut().find(|(key, _)| *key == name) {
        Some(entry) => entry.1 = value,
        None => args.push((name, value)),
    }
}

struct Parser<'a> {
    escape: char,
    build_args: &'a BTreeMap<String, String>,
    base_config: &'a mut dyn FnMut(&str) -> Result<BaseImageConfig, String>,
    declared_stage_names: Vec<Option<String>>,
    /// ARGs declared before the first FROM.
    meta_args: Vec<(String, Option<String>)>,
    stages: Vec<Stage>,
    /// Final ENV and WORKDIR of each finished stage, for stages built on it.
    finished: Vec<(Vec<(String, String)>, String)>,
    current: Option<StageState>,
}

/// The instruction being parsed, for error messages.
struct Context<'l> {
    line: usize,
    instruction: &'l str,
}

impl Context<'_> {
    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError { line: self.line, instruction: self.instruction.to_string(), message: message.into() }
    }

    fn expand_error(&self, err: ExpandError) -> ParseError {
        self.error(err.0)
    }
}

/// The value type of an instruction flag.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    Text,
}

impl<'a> Parser<'a> {
    fn parse_line(&mut self, line: &LogicalLine) -> Result<(), ParseError> {
        let (keyword, rest) = split_keyword(&line.text);
        let instruction = keyword.to_ascii_uppercase();
        let ctx = Context { line: line.line, instruction: &instruction };
        let (args, flags) = extract_flags(rest);
        let args = args.trim();

        if let Some(reason) = unsupported_reason(&instruction) {
            return Err(ctx.error(reason));
        }
        match instruction.as_str() {
            "FROM" => return self.parse_from(&ctx, args, flags),
            "ARG" => return self.parse_arg(&ctx, args, flags),
            "RUN" | "COPY" | "ADD" | "ENV" | "WORKDIR" | "USER" | "CMD" | "ENTRYPOINT" | "EXPOSE" | "LABEL"
            | "SHELL" => {}
            _ => return Err(ctx.error(format!("unknown instruction {keyword:?}"))),
        }
        if self.current.is_none() {
            return Err(ctx.error(
                "instruction before the first FROM: a Dockerfile must start with FROM (only ARG may come before it)",
            ));
        }

        let kind = match instruction.as_str() {
            "RUN" => self.parse_run(&ctx, args, flags)?,
            "COPY" => self.parse_copy(&ctx, args, flags, false)?,
            "ADD" => self.parse_copy(&ctx, args, flags, true)?,
            "ENV" => self.parse_env(&ctx, args, flags)?,
            "WORKDIR" => self.parse_workdir(&ctx, args, flags)?,
            "USER" => self.parse_user(&ctx, args, flags)?,
            "CMD" => InstructionKind::Cmd(self.parse_command(&ctx, args, flags)?),
            "ENTRYPOINT" => InstructionKind::Entrypoint(self.parse_command(&ctx, args, flags)?),
            "EXPOSE" => self.parse_expose(&ctx, args, flags)?,
            "LABEL" => self.parse_label(&ctx, args, flags)?,
            _ => self.parse_shell(&ctx, args, flags)?,
        };
        let stage = self.stages.last_mut().expect("a stage exists once current is set");
        stage.instructions.push(Instruction { line: line.line, kind });
        Ok(())
    }

    fn state(&self) -> &StageState {
        self.current.as_ref().expect("called only inside a stage")
    }

    fn state_mut(&mut self) -> &mut StageState {
        self.current.as_mut().expect("called only inside a stage")
    }

    /// Expands `word` with the current stage's ENV and ARG values.
    fn expand(&self, ctx: &Context, word: &str) -> Result<String, ParseError> {
        let state = self.state();
        let lookup = |name: &str| state.lookup(name);
        Expander::new(self.escape, &lookup).expand_word(word).map_err(|err| ctx.expand_error(err))
    }

    fn expand_words(&self, ctx: &Context, word: &str) -> Result<Vec<String>, ParseError> {
        let state = self.state();
        let lookup = |name: &str| state.lookup(name);
        Expander::new(self.escape, &lookup).expand_words(word).map_err(|err| ctx.expand_error(err))
    }

    /// Expands `word` with the ARGs declared before the first FROM (and the platform ARGs).
    fn expand_meta(&self, ctx: &Context, word: &str) -> Result<String, ParseError> {
        let lookup = |name: &str| self.meta_value(name);
        Expander::new(self.escape, &lookup).expand_word(word).map_err(|err| ctx.expand_error(err))
    }

    fn meta_value(&self, name: &str) -> Option<String> {
        match self.meta_args.iter().find(|(key, _)| key == name) {
            Some((_, value)) => value.clone(),
            None => platform_arg(name),
        }
    }

    fn finish_stage(&mut self) {
        if let Some(state) = self.current.take() {
            self.finished.push((state.env, state.workdir));
        }
    }

    fn parse_from(&mut self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<(), ParseError> {
        let flags = parse_flags(ctx, flags, &[("platform", FlagKind::Text)])?;
        let words: Vec<&str> = args.split_whitespace().collect();
        let (image, name) = match words.as_slice() {
            [image] => (*image, None),
            [image, as_keyword, name] if as_keyword.eq_ignore_ascii_case("as") => (*image, Some(*name)),
            _ => return Err(ctx.error("FROM requires either one argument or three (FROM image AS name)")),
        };

        if let Some(platform) = flags.get("platform") {
            let platform = self.expand_meta(ctx, platform)?;
            if platform != PLATFORM {
                return Err(ctx.error(format!(
                    "platform {platform:?} is not supported: Hearth builds only {PLATFORM} (remove --platform or set it to {PLATFORM})"
                )));
            }
        }

        let index = self.stages.len();
        let name = match name {
            Some(name) => Some(self.validate_stage_name(ctx, name)?),
            None => None,
        };

        let image = self.expand_meta(ctx, image)?;
        if image.is_empty() {
            return Err(ctx.error(format!("base image {args:?} is empty after ARG substitution")));
        }
        // The previous stage is complete now, so a stage built on it starts from its final state.
        self.finish_stage();
        let (base, state) = self.resolve_base(ctx, &image, index)?;
        self.current = Some(state);
        self.stages.push(Stage { name, base, line: ctx.line, instructions: Vec::new() });
        Ok(())
    }

    fn validate_stage_name(&self, ctx: &Context, name: &str) -> Result<String, ParseError> {
        let lower = name.to_ascii_lowercase();
        if !STAGE_NAME.is_match(&lower) {
            return Err(ctx.error(format!(
                "invalid stage name {name:?}: it must start with a letter and contain only letters, digits, '-', '_' and '.'"
            )));
        }
        if self.stages.iter().any(|stage| stage.name.as_deref() == Some(lower.as_str())) {
            return Err(ctx.error(format!("duplicate stage name {lower:?}")));
        }
        Ok(lower)
    }

    /// Resolves a FROM argument to scratch, an earlier stage or an image, and sets up the new
    /// stage's initial ENV and WORKDIR from it.
    fn resolve_base(&mut self, ctx: &Context, image: &str, index: usize) -> Result<(StageBase, StageState), ParseError> {
        let lower = image.to_ascii_lowercase();
        if let Some(earlier) = self.stages.iter().position(|stage| stage.name.as_deref() == Some(lower.as_str())) {
            let (env, workdir) = self.finished[earlier].clone();
            return Ok((StageBase::Stage(earlier), StageState { env, args: Vec::new(), workdir }));
        }
        if let Some(later) = self.later_stage_named(&lower, index) {
            return Err(ctx.error(format!(
                "stage {lower:?} is defined later (stage {later}); a stage can only build on an earlier one"
            )));
        }
        if lower == "scratch" {
            let env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
            return Ok((StageBase::Scratch, StageState { env, args: Vec::new(), workdir: "/".into() }));
        }

        let config = (self.base_config)(image)
            .map_err(|message| ctx.error(format!("base image {image:?}: {message}")))?;
        let mut env = config.env;
        if !env.iter().any(|(key, _)| key == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        let workdir = if config.working_dir.is_empty() { "/".to_string() } else { unix_path::resolve("/", &config.working_dir) };
        Ok((StageBase::Image(image.to_string()), StageState { env, args: Vec::new(), workdir }))
    }

    /// Returns the index of a stage named `name` at or after `from`.
    fn later_stage_named(&self, name: &str, from: usize) -> Option<usize> {
        self.declared_stage_names
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, declared)| declared.as_deref() == Some(name))
            .map(|(index, _)| index)
    }

    fn parse_arg(&mut self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<(), ParseError> {
        parse_flags(ctx, flags, &[])?;
        let words = split_words(args, self.escape);
        if words.is_empty() {
            return Err(ctx.error("ARG requires at least one argument"));
        }

        for word in words {
            let (raw_name, raw_default) = match word.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (word.as_str(), None),
            };
            if raw_name.is_empty() {
                return Err(ctx.error(format!("ARG name is empty in {word:?}")));
            }

            let in_stage = self.current.is_some();
            let expand = |parser: &Self, text: &str| {
                if in_stage {
                    parser.expand(ctx, text)
                } else {
                    parser.expand_meta(ctx, text)
                }
            };
            let name = expand(self, raw_name)?;
            let default = match raw_default {
                Some(text) => Some(expand(self, text)?),
                // Inside a stage, an ARG with no value takes the value of the global ARG of the
                // same name (or of a platform ARG).
                None if in_stage => self.meta_value(&name),
                None => platform_arg(&name),
            };
            let value = self.build_args.get(&name).cloned().or(default);

            match self.current.as_mut() {
                Some(state) => set_arg(&mut state.args, name, value),
                None => set_arg(&mut self.meta_args, name, value),
            }
        }
        Ok(())
    }

    fn parse_run(&self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<InstructionKind, ParseError> {
        if !flags.is_empty() {
            return Err(ctx.error(format!(
                "RUN flags are not supported: {}; run the command without them",
                flags.iter().map(|flag| format!("{flag:?}")).collect::<Vec<_>>().join(", ")
            )));
        }
        let command = self.parse_command_text(ctx, args)?;
        if let Command::Shell(text) = &command {
            self.reject_heredoc(ctx, text)?;
        }
        Ok(InstructionKind::Run { command, env: self.run_env() })
    }

    /// Returns the build arguments passed to RUN: those in scope with a value and not shadowed by ENV.
    fn run_env(&self) -> Vec<(String, String)> {
        let state = self.state();
        let shadowed = |name: &str| state.env.iter().any(|(key, _)| key == name);
        let mut env: Vec<(String, String)> = state
            .args
            .iter()
            .filter(|(name, _)| !shadowed(name))
            .filter_map(|(name, value)| value.clone().map(|value| (name.clone(), value)))
            .collect();

        for name in PREDEFINED_ARGS {
            let declared = state.args.iter().any(|(key, _)| key == name);
            if let Some(value) = self.build_args.get(name).filter(|_| !declared && !shadowed(name)) {
                env.push((name.to_string(), value.clone()));
            }
        }
        env
    }

    fn parse_command(&self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<Command, ParseError> {
        parse_flags(ctx, flags, &[])?;
        self.parse_command_text(ctx, args)
    }

    fn parse_command_text(&self, ctx: &Context, args: &str) -> Result<Command, ParseError> {
        if args.is_empty() {
            return Err(ctx.error(format!("{} requires at least one argument", ctx.instruction)));
        }
        match parse_json_array(ctx, args)? {
            Some(words) => Ok(Command::Exec(words)),
            None => Ok(Command::Shell(args.to_string())),
        }
    }

    fn parse_shell(&self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<InstructionKind, ParseError> {
        parse_flags(ctx, flags, &[])?;
        match parse_json_array(ctx, args)? {
            Some(words) if !words.is_empty() => Ok(InstructionKind::Shell(words)),
            Some(_) => Err(ctx.error("SHELL requires at least one argument")),
            None => Err(ctx.error(format!(
                "SHELL requires the arguments in JSON form, such as [\"/bin/bash\", \"-c\"]; got {args:?}"
            ))),
        }
    }

    fn reject_heredoc(&self, ctx: &Context, text: &str) -> Result<(), ParseError> {
        let words = split_words(text, self.escape);
        match words.iter().find(|word| HEREDOC.is_match(word)) {
            Some(word) => Err(ctx.error(format!(
                "heredocs ({word}) are not supported; write the content to a file in the build context and COPY it"
            ))),
            None => Ok(()),
        }
    }

    fn parse_copy(&self, ctx: &Context, args: &str, flags: Vec<String>, add: bool) -> Result<InstructionKind, ParseError> {
        let allowed: &[(&str, FlagKind)] = if add {
            &[("chown", FlagKind::Text), ("chmod", FlagKind::Text), ("link", FlagKind::Bool)]
        } else {
            &[("from", FlagKind::Text), ("chown", FlagKind::Text), ("chmod", FlagKind::Text), ("link", FlagKind::Bool)]
        };
        let flags = parse_flags(ctx, flags, allowed)?;

        let raw_words = match parse_json_array(ctx, args)? {
            Some(words) => words,
            None => {
                self.reject_heredoc(ctx, args)?;
                args.split_whitespace().map(str::to_string).collect()
            }
        };
        if raw_words.len() < 2 {
            return Err(ctx.error(format!("{} requires at least two arguments: source(s) and destination", ctx.instruction)));
        }
        let mut words = Vec::with_capacity(raw_words.len());
        for word in &raw_words {
            words.push(self.expand(ctx, word)?);
        }
        let dest = words.pop().expect("at least two words");
        let sources = words;

        for source in &sources {
            check_copy_source(ctx, source, add)?;
        }
        if dest.is_empty() {
            return Err(ctx.error("destination is empty after substitution"));
        }

        let from = match flags.get("from") {
            Some(value) => Some(self.resolve_copy_from(ctx, &self.expand(ctx, value)?)?),
            None => None,
        };
        let chown = match flags.get("chown") {
            Some(value) => Some(self.expand(ctx, value)?).filter(|value| !value.is_empty()),
            None => None,
        };
        let chmod = match flags.get("chmod") {
            Some(value) => Some(parse_chmod(ctx, &self.expand(ctx, value)?)?),
            None => None,
        };

        Ok(InstructionKind::Copy { sources, dest, from, chown, chmod, add, workdir: self.state().workdir.clone() })
    }

    fn resolve_copy_from(&self, ctx: &Context, value: &str) -> Result<CopyFrom, ParseError> {
        let current = self.stages.len() - 1;
        let lower = value.to_ascii_lowercase();
        if let Some(index) = self.stages[..current].iter().position(|stage| stage.name.as_deref() == Some(lower.as_str())) {
            return Ok(CopyFrom::Stage(index));
        }
        if let Some(index) = self.later_stage_named(&lower, current) {
            return Err(ctx.error(format!(
                "--from={value}: stage {lower:?} (stage {index}) is not defined before this instruction; a stage can only copy from an earlier one"
            )));
        }
        if let Ok(index) = value.parse::<usize>() {
            if index >= current {
                return Err(ctx.error(format!(
                    "--from={value}: stage index {index} is not an earlier stage (this is stage {current})"
                )));
            }
            return Ok(CopyFrom::Stage(index));
        }
        if value.is_empty() {
            return Err(ctx.error("--from is empty after substitution"));
        }
        Ok(CopyFrom::Image(value.to_string()))
    }

    fn parse_env(&mut self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<InstructionKind, ParseError> {
        parse_flags(ctx, flags, &[])?;
        let pairs = self.parse_pairs(ctx, args)?;
        for (name, value) in &pairs {
            self.state_mut().set_env(name.clone(), value.clone());
        }
        Ok(InstructionKind::Env(pairs))
    }

    fn parse_label(&self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<InstructionKind, ParseError> {
        parse_flags(ctx, flags, &[])?;
        Ok(InstructionKind::Label(self.parse_pairs(ctx, args)?))
    }

    /// Reads `name=value ...` pairs, or the legacy `name value` form when the first word has no
    /// `=`, then substitutes variables in names and values. Every value is expanded with
    /// the variables as they were before this instruction.
    fn parse_pairs(&self, ctx: &Context, args: &str) -> Result<Vec<(String, String)>, ParseError> {
        let words = split_words(args, self.escape);
        let Some(first) = words.first() else {
            return Err(ctx.error(format!("{} requires at least one argument", ctx.instruction)));
        };

        let raw_pairs: Vec<(String, String)> = if !first.contains('=') {
            let mut parts = args.splitn(2, |ch: char| ch.is_ascii_whitespace());
            let name = parts.next().unwrap_or_default();
            let value = parts.next().map(str::trim_start).unwrap_or_default();
            if value.is_empty() {
                return Err(ctx.error(format!(
                    "{} must have two arguments in the form `{} name value`, or use name=value",
                    ctx.instruction, ctx.instruction
                )));
            }
            vec![(name.to_string(), value.to_string())]
        } else {
            let mut pairs = Vec::with_capacity(words.len());
            for word in &words {
                let Some((name, value)) = word.split_once('=') else {
                    return Err(ctx.error(format!("syntax error: no '=' in {word:?}; use the form name=value")));
                };
                pairs.push((name.to_string(), value.to_string()));
            }
            pairs
        };

        let mut pairs = Vec::with_capacity(raw_pairs.len());
        for (raw_name, raw_value) in raw_pairs {
            let name = self.expand(ctx, &raw_name)?;
            if name.is_empty() {
                return Err(ctx.error(format!("empty name in {raw_name:?}={raw_value:?}")));
            }
            pairs.push((name, self.expand(ctx, &raw_value)?));
        }
        Ok(pairs)
    }

    fn parse_workdir(&mut self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<InstructionKind, ParseError> {
        parse_flags(ctx, flags, &[])?;
        let path = self.expand(ctx, args)?;
        if path.is_empty() {
            return Err(ctx.error("WORKDIR requires a path"));
        }
        let workdir = unix_path::resolve(&self.state().workdir, &path);
        self.state_mut().workdir = workdir.clone();
        Ok(InstructionKind::Workdir(workdir))
    }

    fn parse_user(&self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<InstructionKind, ParseError> {
        parse_flags(ctx, flags, &[])?;
        let user = self.expand(ctx, args)?;
        if user.is_empty() {
            return Err(ctx.error("USER requires a user name or ID"));
        }
        Ok(InstructionKind::User(user))
    }

    fn parse_expose(&self, ctx: &Context, args: &str, flags: Vec<String>) -> Result<InstructionKind, ParseError> {
        parse_flags(ctx, flags, &[])?;
        let mut ports = Vec::new();
        for word in args.split_whitespace() {
            ports.extend(self.expand_words(ctx, word)?);
        }
        if ports.is_empty() {
            return Err(ctx.error("EXPOSE requires at least one port"));
        }
        for port in &ports {
            check_port_spec(ctx, port)?;
        }
        Ok(InstructionKind::Expose(ports))
    }
}

fn platform_arg(name: &str) -> Option<String> {
    PLATFORM_ARGS.iter().find(|(key, _)| *key == name).map(|(_, value)| value.to_string())
}

/// Returns the reason a Docker instruction is rejected here, or `None` for supported ones.
fn unsupported_reason(instruction: &str) -> Option<&'static str> {
    Some(match instruction {
        "HEALTHCHECK" => "HEALTHCHECK is not supported: a template's readiness is checked by its ready command",
        "VOLUME" => "VOLUME is not supported: a sandbox has a single root filesystem and no volumes",
        "STOPSIGNAL" => "STOPSIGNAL is not supported: sandboxes are stopped by shutting down their VM",
        "ONBUILD" => "ONBUILD is not supported: templates are not used as base images for other Dockerfiles",
        "MAINTAINER" => "MAINTAINER is not supported (it is deprecated); use LABEL maintainer=\"name\" instead",
        _ => return None,
    })
}

/// Parses `--name=value` flags, rejecting flags not in `allowed` and repeated flags. A bool flag
/// given without a value is `true`.
fn parse_flags(ctx: &Context, flags: Vec<String>, allowed: &[(&str, FlagKind)]) -> Result<BTreeMap<String, String>, ParseError> {
    let mut values = BTreeMap::new();
    for flag in flags {
        let body = flag.trim_start_matches('-');
        let (name, value) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (body, None),
        };
        let Some((_, kind)) = allowed.iter().find(|(allowed_name, _)| *allowed_name == name) else {
            return Err(ctx.error(format!("flag --{name} is not supported")));
        };
        let value = match (kind, value) {
            (FlagKind::Bool, None) => "true".to_string(),
            (FlagKind::Bool, Some(value)) if value == "true" || value == "false" => value.to_string(),
            (FlagKind::Bool, Some(value)) => {
                return Err(ctx.error(format!("flag --{name} takes true or false, not {value:?}")))
            }
            (FlagKind::Text, Some(value)) => value.to_string(),
            (FlagKind::Text, None) => return Err(ctx.error(format!("flag --{name} requires a value (--{name}=...)"))),
        };
        if values.insert(name.to_string(), value).is_some() {
            return Err(ctx.error(format!("flag --{name} is given more than once")));
        }
    }
    Ok(values)
}

/// Parses `args` as a JSON array of strings (exec form). Returns `None` when `args` is not JSON,
/// which makes it shell form as in Docker, and an error for a JSON array with a non-string.
fn parse_json_array(ctx: &Context, args: &str) -> Result<Option<Vec<String>>, ParseError> {
    if !args.starts_with('[') {
        return Ok(None);
    }
    let Ok(values) = serde_json::from_str::<Vec<serde_json::Value>>(args) else {
        return Ok(None);
    };
    let mut words = Vec::with_capacity(values.len());
    for value in values {
        match value {
            serde_json::Value::String(text) => words.push(text),
            other => {
                return Err(ctx.error(format!("the JSON array must contain only strings, found {other}")));
            }
        }
    }
    Ok(Some(words))
}

fn check_copy_source(ctx: &Context, source: &str, add: bool) -> Result<(), ParseError> {
    let is_url = URL_SCHEME.is_match(source);
    let is_git = source.starts_with("git@") || (is_url && source.contains(".git"));
    if add && (is_url || is_git) {
        return Err(ctx.error(format!(
            "ADD from a URL or git repository is not supported: {source:?}; download it with RUN (curl, git clone) instead"
        )));
    }
    if is_url {
        return Err(ctx.error(format!("COPY cannot copy from a URL: {source:?}")));
    }
    if source.is_empty() {
        return Err(ctx.error("source is empty after substitution"));
    }
    Ok(())
}

fn parse_chmod(ctx: &Context, value: &str) -> Result<u32, ParseError> {
    match u32::from_str_radix(value, 8) {
        Ok(mode) if mode <= 0o7777 && !value.is_empty() => Ok(mode),
        _ => Err(ctx.error(format!("--chmod={value}: expected an octal mode such as 755 or 0644"))),
    }
}

fn check_port_spec(ctx: &Context, spec: &str) -> Result<(), ParseError> {
    let invalid = || ctx.error(format!("invalid port {spec:?}: expected PORT, PORT/PROTOCOL or START-END/PROTOCOL (tcp, udp, sctp)"));
    let captures = PORT_SPEC.captures(spec).ok_or_else(invalid)?;
    let start: u32 = captures[1].parse().map_err(|_| invalid())?;
    let end: u32 = match captures.get(3) {
        Some(end) => end.as_str().parse().map_err(|_| invalid())?,
        None => start,
    };
    if start == 0 || end > 65535 || end < start {
        return Err(invalid());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse;

    fn parse_ok(text: &str) -> Dockerfile {
        parse(text, &BTreeMap::new()).unwrap_or_else(|err| panic!("parse failed: {err}"))
    }

    fn parse_with_args(text: &str, args: &[(&str, &str)]) -> Dockerfile {
        let args: BTreeMap<String, String> = args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        parse(text, &args).unwrap_or_else(|err| panic!("parse failed: {err}"))
    }

    fn parse_err(text: &str) -> ParseError {
        parse(text, &BTreeMap::new()).expect_err("parse should fail")
    }

    fn kinds(dockerfile: &Dockerfile, stage: usize) -> Vec<InstructionKind> {
        dockerfile.stages[stage].instructions.iter().map(|i| i.kind.clone()).collect()
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn env_of(dockerfile: &Dockerfile, stage: usize, index: usize) -> Vec<(String, String)> {
        match &dockerfile.stages[stage].instructions[index].kind {
            InstructionKind::Env(pairs) => pairs.clone(),
            other => panic!("expected ENV, got {other:?}"),
        }
    }

    fn run_env(dockerfile: &Dockerfile, stage: usize, index: usize) -> Vec<(String, String)> {
        match &dockerfile.stages[stage].instructions[index].kind {
            InstructionKind::Run { env, .. } => env.clone(),
            other => panic!("expected RUN, got {other:?}"),
        }
    }

    #[test]
    fn env_quotes_and_escapes_byte_for_byte() {
        let text = r#"FROM debian
ENV A="a \"quoted\" b" B='single $HOME \n' C=back\\slash D="line\nbreak" E=a\ b
ENV F="$(rm -rf /)" G=\$HOME H=`id` I=$(id) J="it's" K='say "hi"' L="" M=
"#;
        let env = env_of(&parse_ok(text), 0, 0);
        assert_eq!(env[0], ("A".into(), r#"a "quoted" b"#.into()));
        assert_eq!(env[1], ("B".into(), r"single $HOME \n".into()));
        assert_eq!(env[2], ("C".into(), r"back\slash".into()));
        assert_eq!(env[3], ("D".into(), r"line\nbreak".into()));
        assert_eq!(env[4], ("E".into(), "a b".into()));

        let env = env_of(&parse_ok(text), 0, 1);
        assert_eq!(env[0], ("F".into(), "$(rm -rf /)".into()));
        assert_eq!(env[1], ("G".into(), "$HOME".into()));
        assert_eq!(env[2], ("H".into(), "`id`".into()));
        assert_eq!(env[3], ("I".into(), "$(id)".into()));
        assert_eq!(env[4], ("J".into(), "it's".into()));
        assert_eq!(env[5], ("K".into(), r#"say "hi""#.into()));
        assert_eq!(env[6], ("L".into(), String::new()));
        assert_eq!(env[7], ("M".into(), String::new()));
    }

    #[test]
    fn env_double_quoted_backslash_kept() {
        let env = env_of(&parse_ok("FROM a\nENV P=\"C:\\dir\\file\" Q=\"\\\\\" R=\"\\$\"\n"), 0, 0);
        assert_eq!(env, pairs(&[("P", r"C:\dir\file"), ("Q", r"\"), ("R", "$")]));
    }

    #[test]
    fn env_legacy_form_keeps_inner_spacing() {
        let env = env_of(&parse_ok("FROM a\nENV MSG hello   \"big  world\" x\n"), 0, 0);
        assert_eq!(env, pairs(&[("MSG", "hello   big  world x")]));
    }

    #[test]
    fn env_values_see_previous_instruction_only() {
        let dockerfile = parse_ok("FROM a\nENV A=1 B=$A\nENV C=${A}2 A=3\nENV D=$A\n");
        assert_eq!(env_of(&dockerfile, 0, 0), pairs(&[("A", "1"), ("B", "")]));
        assert_eq!(env_of(&dockerfile, 0, 1), pairs(&[("C", "12"), ("A", "3")]));
        assert_eq!(env_of(&dockerfile, 0, 2), pairs(&[("D", "3")]));
    }

    #[test]
    fn env_path_extends_default_path() {
        let env = env_of(&parse_ok("FROM a\nENV PATH=/opt/bin:$PATH\n"), 0, 0);
        assert_eq!(env, pairs(&[("PATH", &format!("/opt/bin:{DEFAULT_PATH}"))]));
    }

    #[test]
    fn env_continuation_lines() {
        let dockerfile = parse_ok("FROM a\nENV A=1 \\\n    # comment inside\n    B=\"two words\"\nUSER x\n");
        assert_eq!(env_of(&dockerfile, 0, 0), pairs(&[("A", "1"), ("B", "two words")]));
        assert_eq!(dockerfile.stages[0].instructions[1].line, 5);
    }

    #[test]
    fn env_with_backtick_escape_keeps_backslashes() {
        let dockerfile = parse_ok("# escape=`\nFROM a\nENV P=C:\\path Q=a` b `\n  R=x\n");
        assert_eq!(env_of(&dockerfile, 0, 0), pairs(&[("P", r"C:\path"), ("Q", "a b"), ("R", "x")]));
    }

    #[test]
    fn env_errors_carry_line() {
        let err = parse_err("FROM a\n\nENV A=\"open\n");
        assert_eq!(err.line, 3);
        assert_eq!(err.instruction, "ENV");
        assert!(err.message.contains("double-quote"), "{err}");

        let err = parse_err("FROM a\nENV A=1 B\n");
        assert_eq!((err.line, err.instruction.as_str()), (2, "ENV"));

        let err = parse_err("FROM a\nENV ONLYNAME\n");
        assert!(err.message.contains("two arguments"), "{err}");

        let err = parse_err("FROM a\nENV\n");
        assert!(err.message.contains("at least one argument"), "{err}");
    }

    #[test]
    fn run_shell_form_is_verbatim() {
        let dockerfile = parse_ok("FROM a\nRUN echo \"$HOME\" '$X' \\\n  && ls $(pwd)\n");
        assert_eq!(
            kinds(&dockerfile, 0)[0],
            InstructionKind::Run { command: Command::Shell("echo \"$HOME\" '$X'   && ls $(pwd)".into()), env: vec![] }
        );
    }

    #[test]
    fn run_exec_form_and_bracket_shell_form() {
        let dockerfile = parse_ok("FROM a\nRUN [\"/bin/sh\", \"-c\", \"echo $X\"]\nRUN [ -f /etc/passwd ]\n");
        let steps = kinds(&dockerfile, 0);
        assert_eq!(
            steps[0],
            InstructionKind::Run { command: Command::Exec(vec!["/bin/sh".into(), "-c".into(), "echo $X".into()]), env: vec![] }
        );
        assert_eq!(steps[1], InstructionKind::Run { command: Command::Shell("[ -f /etc/passwd ]".into()), env: vec![] });
    }

    #[test]
    fn run_exec_form_with_non_string_is_rejected() {
        let err = parse_err("FROM a\nRUN [\"echo\", 1]\n");
        assert_eq!((err.line, err.instruction.as_str()), (2, "RUN"));
        assert!(err.message.contains("only strings"), "{err}");
    }

    #[test]
    fn cmd_and_entrypoint_are_not_substituted() {
        let dockerfile = parse_ok("FROM a\nENV X=1\nCMD echo $X\nENTRYPOINT [\"/run\", \"$X\"]\n");
        let steps = kinds(&dockerfile, 0);
        assert_eq!(steps[1], InstructionKind::Cmd(Command::Shell("echo $X".into())));
        assert_eq!(steps[2], InstructionKind::Entrypoint(Command::Exec(vec!["/run".into(), "$X".into()])));
    }

    #[test]
    fn instructions_are_case_insensitive() {
        let dockerfile = parse_ok("from debian as Base\nrun true\nWorkDir /x\n");
        assert_eq!(dockerfile.stages[0].name.as_deref(), Some("base"));
        assert_eq!(kinds(&dockerfile, 0)[1], InstructionKind::Workdir("/x".into()));
    }

    #[test]
    fn arg_scoping_across_stages() {
        let text = "ARG BASE=debian\nARG TAG\nFROM ${BASE}:${TAG:-12} AS build\nARG BASE\nARG V=1\nRUN a\nENV V=override\nRUN b\nFROM build\nRUN c\nENV B=$BASE\n";
        let dockerfile = parse_with_args(text, &[("TAG", "bookworm"), ("V", "2"), ("UNDECLARED", "x")]);

        assert_eq!(dockerfile.stages[0].base, StageBase::Image("debian:bookworm".into()));
        assert_eq!(run_env(&dockerfile, 0, 0), pairs(&[("BASE", "debian"), ("V", "2")]));
        assert_eq!(run_env(&dockerfile, 0, 2), pairs(&[("BASE", "debian")]));
        assert_eq!(dockerfile.stages[1].base, StageBase::Stage(0));
        assert_eq!(run_env(&dockerfile, 1, 0), vec![]);
        assert_eq!(env_of(&dockerfile, 1, 1), pairs(&[("B", "")]));
    }

    #[test]
    fn arg_default_used_without_build_arg() {
        let dockerfile = parse_ok("ARG TAG=12\nFROM debian:$TAG\nARG GREETING=\"hello world\" EMPTY\nRUN x\nENV G=$GREETING\n");
        assert_eq!(dockerfile.stages[0].base, StageBase::Image("debian:12".into()));
        assert_eq!(run_env(&dockerfile, 0, 0), pairs(&[("GREETING", "hello world")]));
        assert_eq!(env_of(&dockerfile, 0, 1), pairs(&[("G", "hello world")]));
    }

    #[test]
    fn global_arg_not_visible_in_stage_without_redeclaring() {
        let dockerfile = parse_ok("ARG X=1\nFROM a\nENV Y=$X\n");
        assert_eq!(env_of(&dockerfile, 0, 0), pairs(&[("Y", "")]));
    }

    #[test]
    fn arg_value_refers_to_earlier_arg() {
        let dockerfile = parse_with_args("FROM a\nARG A=x\nARG B=${A}-y\nRUN r\n", &[("A", "z")]);
        assert_eq!(run_env(&dockerfile, 0, 0), pairs(&[("A", "z"), ("B", "z-y")]));
    }

    #[test]
    fn predefined_proxy_and_platform_args() {
        let dockerfile = parse_with_args("FROM a\nARG TARGETARCH\nRUN r\n", &[("https_proxy", "http://proxy:3128")]);
        assert_eq!(run_env(&dockerfile, 0, 0), pairs(&[("TARGETARCH", "amd64"), ("https_proxy", "http://proxy:3128")]));
    }

    #[test]
    fn from_platform_flag() {
        assert!(parse("FROM --platform=linux/amd64 a\n", &BTreeMap::new()).is_ok());
        assert!(parse("FROM --platform=$BUILDPLATFORM a\n", &BTreeMap::new()).is_ok());
        let err = parse_err("FROM --platform=linux/arm64 a\n");
        assert_eq!((err.line, err.instruction.as_str()), (1, "FROM"));
        assert!(err.message.contains("linux/arm64"), "{err}");
    }

    #[test]
    fn from_forms_and_errors() {
        let dockerfile = parse_ok("FROM scratch\nFROM Scratch AS s2\nFROM s2\n");
        assert_eq!(dockerfile.stages[0].base, StageBase::Scratch);
        assert_eq!(dockerfile.stages[1].base, StageBase::Scratch);
        assert_eq!(dockerfile.stages[2].base, StageBase::Stage(1));

        let err = parse_err("FROM a AS x\nFROM b AS X\n");
        assert!(err.message.contains("duplicate stage name"), "{err}");
        assert_eq!(err.line, 2);

        let err = parse_err("FROM a AS 1bad\n");
        assert!(err.message.contains("invalid stage name"), "{err}");

        let err = parse_err("FROM a b\n");
        assert!(err.message.contains("one argument or three"), "{err}");

        let err = parse_err("FROM later\nFROM b AS later\n");
        assert_eq!((err.line, err.instruction.as_str()), (1, "FROM"));
        assert!(err.message.contains("defined later"), "{err}");

        let err = parse_err("FROM $MISSING\n");
        assert!(err.message.contains("empty"), "{err}");
    }

    #[test]
    fn copy_from_stage_index_and_image() {
        let text = "FROM a AS build\nFROM b\nCOPY --from=build /x /y\nCOPY --from=0 /x /y\nCOPY --from=BUILD /x /y\nCOPY --from=alpine:3 /x /y\n";
        let steps = kinds(&parse_ok(text), 1);
        let from = |index: usize| match &steps[index] {
            InstructionKind::Copy { from, .. } => from.clone(),
            other => panic!("expected COPY, got {other:?}"),
        };
        assert_eq!(from(0), Some(CopyFrom::Stage(0)));
        assert_eq!(from(1), Some(CopyFrom::Stage(0)));
        assert_eq!(from(2), Some(CopyFrom::Stage(0)));
        assert_eq!(from(3), Some(CopyFrom::Image("alpine:3".into())));
    }

    #[test]
    fn copy_from_later_stage_is_rejected() {
        let err = parse_err("FROM a\nCOPY --from=later /x /y\nFROM b AS later\n");
        assert_eq!((err.line, err.instruction.as_str()), (2, "COPY"));
        assert!(err.message.contains("not defined before"), "{err}");

        let err = parse_err("FROM a\nFROM b\nCOPY --from=1 /x /y\n");
        assert_eq!(err.line, 3);
        assert!(err.message.contains("not an earlier stage"), "{err}");

        let err = parse_err("FROM a AS self\nCOPY --from=self /x /y\n");
        assert_eq!(err.line, 2);
    }

    #[test]
    fn copy_flags_and_forms() {
        let text = "FROM a\nARG U=app\nWORKDIR /srv\nCOPY --chown=$U:$U --chmod=0755 --link src/ ./dst/\nCOPY [\"a file.txt\", \"b\", \"/dest dir/\"]\nADD --chmod=644 x.tar /opt/\n";
        let steps = kinds(&parse_ok(text), 0);
        assert_eq!(
            steps[1],
            InstructionKind::Copy {
                sources: vec!["src/".into()],
                dest: "./dst/".into(),
                from: None,
                chown: Some("app:app".into()),
                chmod: Some(0o755),
                add: false,
                workdir: "/srv".into(),
            }
        );
        match &steps[2] {
            InstructionKind::Copy { sources, dest, .. } => {
                assert_eq!(sources, &vec!["a file.txt".to_string(), "b".to_string()]);
                assert_eq!(dest, "/dest dir/");
            }
            other => panic!("expected COPY, got {other:?}"),
        }
        match &steps[3] {
            InstructionKind::Copy { add, chmod, .. } => {
                assert!(*add);
                assert_eq!(*chmod, Some(0o644));
            }
            other => panic!("expected ADD, got {other:?}"),
        }
    }

    #[test]
    fn copy_sources_are_substituted() {
        let steps = kinds(&parse_ok("FROM a\nENV SRC=app DST=/opt\nCOPY ${SRC}/*.py $DST/\n"), 0);
        match &steps[1] {
            InstructionKind::Copy { sources, dest, .. } => {
                assert_eq!(sources, &vec!["app/*.py".to_string()]);
                assert_eq!(dest, "/opt/");
            }
            other => panic!("expected COPY, got {other:?}"),
        }
    }

    #[test]
    fn copy_errors() {
        let cases = [
            ("FROM a\nCOPY --chmod=abc x /y\n", "octal"),
            ("FROM a\nCOPY --chmod=99999 x /y\n", "octal"),
            ("FROM a\nCOPY --parents x /y\n", "--parents is not supported"),
            ("FROM a\nCOPY --exclude=*.md x /y\n", "--exclude is not supported"),
            ("FROM a\nADD --checksum=sha256:00 x /y\n", "--checksum is not supported"),
            ("FROM a\nADD --from=b x /y\n", "--from is not supported"),
            ("FROM a\nCOPY --chown x /y\n", "requires a value"),
            ("FROM a\nCOPY --link=maybe x /y\n", "true or false"),
            ("FROM a\nCOPY x\n", "at least two arguments"),
            ("FROM a\nCOPY \"a b\" /y\n", "double-quote"),
            ("FROM a\nADD https://example.com/x.tgz /y\n", "URL or git"),
            ("FROM a\nADD git@github.com:org/repo.git /y\n", "URL or git"),
            ("FROM a\nADD https://github.com/org/repo.git#main /y\n", "URL or git"),
            ("FROM a\nCOPY http://example.com/x /y\n", "cannot copy from a URL"),
            ("FROM a\nCOPY <<EOF /y\nhello\nEOF\n", "heredocs"),
        ];
        for (text, expected) in cases {
            let err = parse_err(text);
            assert_eq!(err.line, 2, "{text:?}: {err}");
            assert!(err.message.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn run_flags_and_heredocs_are_rejected() {
        let cases = [
            ("FROM a\nRUN --mount=type=cache,target=/root/.cache pip install x\n", "RUN flags are not supported"),
            ("FROM a\nRUN --network=none true\n", "--network"),
            ("FROM a\nRUN --security=insecure true\n", "RUN flags"),
            ("FROM a\nRUN <<EOF\necho hi\nEOF\n", "heredocs"),
            ("FROM a\nRUN python3 <<-'PY' > out\nprint(1)\nPY\n", "heredocs"),
            ("FROM a\nRUN cat 0<<\"EOT\"\nx\nEOT\n", "heredocs"),
        ];
        for (text, expected) in cases {
            let err = parse_err(text);
            assert_eq!((err.line, err.instruction.as_str()), (2, "RUN"), "{text:?}: {err}");
            assert!(err.message.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn run_here_string_and_shift_are_not_heredocs() {
        let dockerfile = parse_ok("FROM a\nRUN cat <<< \"x\" && echo $((1<<2)) \"<<EOF\"\n");
        assert_eq!(dockerfile.stages[0].instructions.len(), 1);
    }

    #[test]
    fn unsupported_instructions_report_line() {
        let cases = [
            ("HEALTHCHECK CMD curl -f http://localhost/", "HEALTHCHECK", "HEALTHCHECK is not supported"),
            ("VOLUME /data", "VOLUME", "VOLUME is not supported"),
            ("STOPSIGNAL SIGTERM", "STOPSIGNAL", "STOPSIGNAL is not supported"),
            ("ONBUILD RUN echo", "ONBUILD", "ONBUILD is not supported"),
            ("MAINTAINER me@example.com", "MAINTAINER", "MAINTAINER is not supported"),
            ("healthcheck NONE", "HEALTHCHECK", "HEALTHCHECK is not supported"),
            ("FROB x", "FROB", "unknown instruction \"FROB\""),
        ];
        for (line, instruction, message) in cases {
            let text = format!("FROM a\n# comment\n\nRUN true\n{line}\n");
            let err = parse_err(&text);
            assert_eq!(err.line, 5, "{line}");
            assert_eq!(err.instruction, instruction, "{line}");
            assert!(err.message.contains(message), "{line}: {err}");
            assert!(err.to_string().starts_with(&format!("line 5: {instruction}: ")), "{err}");
        }
    }

    #[test]
    fn missing_from_errors() {
        let err = parse_err("");
        assert!(err.message.contains("empty"), "{err}");
        let err = parse_err("# only a comment\n\n");
        assert!(err.message.contains("empty"), "{err}");
        let err = parse_err("ARG X=1\n");
        assert!(err.message.contains("no FROM"), "{err}");
        let err = parse_err("\nRUN true\nFROM a\n");
        assert_eq!((err.line, err.instruction.as_str()), (2, "RUN"));
        assert!(err.message.contains("before the first FROM"), "{err}");
    }

    #[test]
    fn syntax_directive_through_parse() {
        assert!(parse("# syntax=docker/dockerfile:1\nFROM a\n", &BTreeMap::new()).is_ok());
        let err = parse_err("# syntax=ghcr.io/other/frontend\nFROM a\n");
        assert_eq!((err.line, err.instruction.as_str()), (1, "# syntax"));
    }

    #[test]
    fn workdir_resolves_against_previous() {
        let text = "FROM a AS base\nENV APP=/srv/app\nWORKDIR $APP\nWORKDIR sub\nWORKDIR ../other/\nCOPY x y\nFROM base\nWORKDIR more\n";
        let dockerfile = parse_ok(text);
        let steps = kinds(&dockerfile, 0);
        assert_eq!(steps[1], InstructionKind::Workdir("/srv/app".into()));
        assert_eq!(steps[2], InstructionKind::Workdir("/srv/app/sub".into()));
        assert_eq!(steps[3], InstructionKind::Workdir("/srv/app/other".into()));
        match &steps[4] {
            InstructionKind::Copy { workdir, .. } => assert_eq!(workdir, "/srv/app/other"),
            other => panic!("expected COPY, got {other:?}"),
        }
        assert_eq!(kinds(&dockerfile, 1)[0], InstructionKind::Workdir("/srv/app/other/more".into()));
    }

    #[test]
    fn user_expose_label_shell() {
        let text = "FROM a\nARG UID=1000\nENV PORTS=\"8080 9090\"\nUSER ${UID}:\"${GID:-100}\"\nEXPOSE 80 53/udp $PORTS 7000-7010/tcp\nLABEL \"com.example.v\"=\"1.0\" desc=\"a b\" empty=\"\"\nLABEL legacy value with spaces\nSHELL [\"/bin/bash\", \"-o\", \"pipefail\", \"-c\"]\n";
        let steps = kinds(&parse_ok(text), 0);
        assert_eq!(steps[1], InstructionKind::User("1000:100".into()));
        assert_eq!(
            steps[2],
            InstructionKind::Expose(vec!["80".into(), "53/udp".into(), "8080".into(), "9090".into(), "7000-7010/tcp".into()])
        );
        assert_eq!(steps[3], InstructionKind::Label(pairs(&[("com.example.v", "1.0"), ("desc", "a b"), ("empty", "")])));
        assert_eq!(steps[4], InstructionKind::Label(pairs(&[("legacy", "value with spaces")])));
        assert_eq!(
            steps[5],
            InstructionKind::Shell(vec!["/bin/bash".into(), "-o".into(), "pipefail".into(), "-c".into()])
        );
    }

    #[test]
    fn expose_shell_and_user_errors() {
        let cases = [
            ("EXPOSE 70000", "EXPOSE", "invalid port"),
            ("EXPOSE 80/quic", "EXPOSE", "invalid port"),
            ("EXPOSE 90-80", "EXPOSE", "invalid port"),
            ("SHELL /bin/bash -c", "SHELL", "JSON form"),
            ("SHELL []", "SHELL", "at least one"),
            ("USER $NOBODY", "USER", "requires a user"),
            ("WORKDIR", "WORKDIR", "requires a path"),
            ("CMD", "CMD", "at least one argument"),
            ("ENV --force A=1", "ENV", "--force is not supported"),
        ];
        for (line, instruction, message) in cases {
            let err = parse_err(&format!("FROM a\n{line}\n"));
            assert_eq!((err.line, err.instruction.as_str()), (2, instruction), "{line}");
            assert!(err.message.contains(message), "{line}: {err}");
        }
    }

    #[test]
    fn base_image_config_feeds_env_and_workdir() {
        let mut asked = Vec::new();
        let mut resolver = |image: &str| {
            asked.push(image.to_string());
            Ok(BaseImageConfig { env: pairs(&[("PATH", "/img/bin"), ("LANG", "C.UTF-8")]), working_dir: "/home/user".into() })
        };
        let dockerfile = crate::parse_with_base_images(
            "FROM python:3\nENV PATH=/x:$PATH L=$LANG\nWORKDIR app\nFROM scratch\n",
            &BTreeMap::new(),
            &mut resolver,
        )
        .unwrap();
        assert_eq!(asked, vec!["python:3".to_string()]);
        assert_eq!(env_of(&dockerfile, 0, 0), pairs(&[("PATH", "/x:/img/bin"), ("L", "C.UTF-8")]));
        assert_eq!(kinds(&dockerfile, 0)[1], InstructionKind::Workdir("/home/user/app".into()));

        let mut failing = |_: &str| Err("manifest unknown".to_string());
        let err = crate::parse_with_base_images("FROM nope:1\n", &BTreeMap::new(), &mut failing).unwrap_err();
        assert_eq!(err.to_string(), "line 1: FROM: base image \"nope:1\": manifest unknown");
    }

    #[test]
    fn lines_of_instructions_are_recorded() {
        let dockerfile = parse_ok("# syntax=docker/dockerfile:1\n\nFROM a\n\nRUN a \\\n  b\n\nCOPY x /y\n");
        assert_eq!(dockerfile.stages[0].line, 3);
        let lines: Vec<usize> = dockerfile.stages[0].instructions.iter().map(|i| i.line).collect();
        assert_eq!(lines, vec![5, 8]);
    }
}
