//! What the runner does for a letter before any job: resolving a policy reference to
//! a stored version and loading its compilation, installing an upload, checking a
//! letter when it is written, and previewing it for one recipient (the API's and the
//! console's preview).

use super::*;

impl Runner {
    /// The compiled policy version a job or letter uses, waiting for its compilation
    /// (see `compile`).
    pub async fn load_policy(
        &self,
        version: &PolicyVersion,
        kind: PluginKind,
    ) -> Result<Arc<Policy>, RunnerError> {
        self.compiled(&version.id, &version.name, kind).await
    }

    /// Checks a component cheaply (a component, importing only what the host links,
    /// exporting its kind's function), stores it as the latest version of `name` and
    /// starts compiling it in the background. Returns the plugin and whether these bytes
    /// were new.
    pub async fn install_plugin(
        &self,
        name: String,
        kind: PluginKind,
        bytes: bytes::Bytes,
    ) -> Result<(Plugin, bool), RunnerError> {
        use sha2::Digest;
        // Milliseconds even for tens of MB, but not nothing: off the async threads.
        let max_memory_mib = self.inner.policies.max_memory_mib();
        let (id, bytes) = tokio::task::spawn_blocking(move || {
            crate::policy::inspect::check(&bytes, kind, max_memory_mib)?;
            Ok::<_, PolicyError>((hex::encode(sha2::Sha256::digest(&bytes)), bytes))
        })
        .await
        .map_err(|e| RunnerError::Invalid(format!("policy check task failed: {e}")))??;
        let plugin = Plugin {
            id,
            name,
            kind,
            size: bytes.len() as u64,
            created_at: now(),
        };
        let (plugin, created) = self.inner.store.put_plugin(plugin, bytes.clone()).await?;
        self.compile_in_background(&plugin.id, &plugin.name, kind, bytes);
        Ok((plugin, created))
    }

    /// The policy version a letter's reference names: `NAME` is the latest version of
    /// NAME (at the moment this is called), `NAME@ID` pins version ID of NAME. It must be
    /// of `kind`.
    pub async fn resolve(&self, reference: &str, kind: PluginKind) -> Result<PolicyVersion, RunnerError> {
        let store = &self.inner.store;
        let plugin = match reference.split_once('@') {
            Some((name, id)) => store
                .plugin_version(name.to_string(), id.to_string())
                .await?
                .ok_or_else(|| {
                    RunnerError::Invalid(format!("the {kind} policy {name:?} has no version {id:?}"))
                })?,
            None => store
                .plugin_by_name(reference.to_string())
                .await?
                .ok_or_else(|| {
                    RunnerError::Invalid(format!(
                        "the {kind} policy {reference:?} is not an uploaded plugin"
                    ))
                })?,
        };
        if plugin.kind != kind {
            return Err(RunnerError::Invalid(format!(
                "{reference:?} is {} policy, not {} policy",
                plugin.kind.with_article(),
                kind.with_article()
            )));
        }
        Ok(PolicyVersion {
            name: plugin.name,
            id: plugin.id,
        })
    }

    /// A letter's filter and template, resolved as `resolve_loaded` does: compiled now, so
    /// a broken policy is refused before anything depends on it.
    pub(super) async fn resolve_letter(&self, letter: &Letter) -> Result<(Resolved, Resolved), RunnerError> {
        let filter = self.resolve_loaded(&letter.filter, PluginKind::Filter).await?;
        let template = self
            .resolve_loaded(&letter.template, PluginKind::Template)
            .await?;
        Ok((filter, template))
    }

    /// `resolve`, then compile (or find compiled) the version it names.
    pub(super) async fn resolve_loaded(
        &self,
        reference: &str,
        kind: PluginKind,
    ) -> Result<Resolved, RunnerError> {
        let version = self.resolve(reference, kind).await?;
        let policy = match self.load_policy(&version, kind).await {
            Ok(policy) => policy,
            // The upload was stored, but its compilation found it cannot run.
            Err(RunnerError::Policy(e)) if e.failed_policy().is_none() => {
                return Err(RunnerError::Invalid(format!(
                    "the {kind} policy {}@{} cannot be used: {e}",
                    version.name,
                    &version.id[..version.id.len().min(12)]
                )));
            }
            Err(e) => return Err(e),
        };
        Ok((version, policy))
    }

    /// Checks a letter before it is stored, so that a letter that would fail for every
    /// recipient is refused when it is written, not found out at send time: its
    /// policies must exist, be of their kinds and compile; 0.2 policies' `validate` must
    /// accept it; the built-in template's subject, text and HTML must parse
    /// (`policy::check_default_template`); a custom template must render the letter for
    /// a sample recipient, as a preview would, into a message that can be built.
    ///
    /// A letter with both built-ins is checked natively, by the same rules their guests
    /// apply (`policy::check_default_template`, `letterbox_segment`): it does not wait
    /// for their compilation, which a new installation's first minute would.
    pub async fn check_letter(&self, letter: &Letter) -> Result<(), RunnerError> {
        let builtin = is_builtin(&letter.template, DEFAULT_TEMPLATE_NAME);
        if builtin && is_builtin(&letter.filter, policy::builtin::DEFAULT_FILTER_NAME) {
            // They must still be the versions they name, of their kinds.
            self.resolve(&letter.filter, PluginKind::Filter).await?;
            self.resolve(&letter.template, PluginKind::Template).await?;
            let mut problems = builtin_template_problems(letter);
            let params = serde_json::Value::Object(letter.params.clone()).to_string();
            if let Err(message) = letterbox_segment::segment_of(&params) {
                problems.insert(0, ("params.segment".to_string(), message));
            }
            if !problems.is_empty() {
                return Err(RunnerError::InvalidFields(problems));
            }
            return Ok(());
        }
        // Both must exist and be able to run: their compilations are awaited.
        let ((_, filter), (_, template)) = self.resolve_letter(letter).await?;
        let newsletter = self.inner.store.newsletter(letter.newsletter_id).await?;
        let evaluator = Arc::new(self.inner.policies.evaluator(
            filter,
            template,
            LetterInput::new(letter, &newsletter),
        )?);
        // The policies' own checks (0.2 `validate`); the built-in template is checked
        // natively instead, with the same rules and quicker.
        let mut problems: Vec<(String, String)> = evaluator
            .validate_async(!builtin)
            .await
            .map_err(|e| match e {
                PolicyError::Engine(_) => RunnerError::Policy(e),
                e => RunnerError::InvalidFields(vec![(
                    "letter".into(),
                    format!("checking the letter failed: {e}"),
                )]),
            })?
            .into_iter()
            .map(|p| (p.field, p.message))
            .collect();
        if builtin {
            problems.extend(builtin_template_problems(letter));
        }
        if !problems.is_empty() {
            return Err(RunnerError::InvalidFields(problems));
        }
        if builtin {
            return Ok(());
        }
        // A sample recipient, not a real one: a template that fails for one subscriber's
        // data is that subscriber's failure at send time, not a reason to refuse the
        // letter. What fails for a plain recipient fails for everyone.
        let subscriber = Subscriber {
            id: 0,
            newsletter_id: newsletter.id,
            email: "preview@example.org".into(),
            name: Some("Preview".into()),
            attributes: Default::default(),
            status: SubscriberStatus::Active,
            created_at: now(),
        };
        let url = self.unsubscribe_url(newsletter.id, subscriber.id);
        let who = "a sample recipient (preview@example.org, no attributes)";
        let refused = |message: String| RunnerError::InvalidFields(vec![("template".into(), message)]);
        let rendered = match evaluator.render_async(subscriber.clone(), url.clone()).await {
            Ok(rendered) => rendered,
            Err(e @ PolicyError::Engine(_)) => return Err(e.into()),
            Err(e) => return Err(refused(format!("rendering for {who} failed: {e}"))),
        };
        let message_id = format!("letterbox.check@{}", mail::mailbox_domain(&newsletter.from));
        mail::format(&outgoing(&newsletter, subscriber, rendered, message_id, url))
            .map_err(|e| refused(format!("the message rendered for {who} cannot be built: {e}")))?;
        Ok(())
    }

    /// Runs a letter's filter and template (the versions a send would use now) for one
    /// recipient, stored or given inline, and builds the message. Sends nothing.
    pub async fn preview(&self, letter_id: u64, target: PreviewTarget) -> Result<Preview, RunnerError> {
        let letter = self.inner.store.letter(letter_id).await?;
        self.preview_letter(&letter, target).await
    }

    /// `preview` of a letter as given (a draft in the console's editor, not stored).
    pub async fn preview_letter(
        &self,
        letter: &Letter,
        target: PreviewTarget,
    ) -> Result<Preview, RunnerError> {
        let store = &self.inner.store;
        let letter = letter.clone();
        let newsletter = store.newsletter(letter.newsletter_id).await?;
        let ((filter, filter_policy), (template, template_policy)) = self.resolve_letter(&letter).await?;
        let evaluator = Arc::new(self.inner.policies.evaluator(
            filter_policy,
            template_policy,
            LetterInput::new(&letter, &newsletter),
        )?);
        let subscriber = match target {
            PreviewTarget::Subscriber(id) => store.subscriber(newsletter.id, id).await?,
            PreviewTarget::Inline(new) => Subscriber {
                id: 0,
                newsletter_id: newsletter.id,
                email: new.email,
                name: new.name,
                attributes: new.attributes,
                status: SubscriberStatus::Active,
                created_at: now(),
            },
        };
        let url = self.unsubscribe_url(newsletter.id, subscriber.id);
        let (subscriber, verdict) = evaluator.evaluate_async(subscriber, url.clone()).await?;
        let message = match &verdict {
            Verdict::Skip(_) => None,
            Verdict::Send(rendered) => {
                let message_id = format!(
                    "letterbox.preview.{}@{}",
                    subscriber.id,
                    mail::mailbox_domain(&newsletter.from)
                );
                let outgoing = outgoing(&newsletter, subscriber, rendered.clone(), message_id, url);
                Some(mail::format(&outgoing).map_err(|e| RunnerError::Invalid(e.to_string()))?)
            }
        };
        Ok(Preview {
            filter,
            template,
            verdict,
            message,
        })
    }
}

/// Whom a preview renders for.
pub enum PreviewTarget {
    Subscriber(u64),
    Inline(NewSubscriber),
}

/// What a send would do for one recipient.
pub struct Preview {
    pub filter: PolicyVersion,
    pub template: PolicyVersion,
    pub verdict: Verdict,
    /// The complete message (RFC 5322) when the filter says send.
    pub message: Option<String>,
}

/// Whether a policy reference names built-in `name`, its latest version or a pinned one.
fn is_builtin(reference: &str, name: &str) -> bool {
    reference == name
        || reference
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('@'))
}

/// What the built-in template would find wrong with a letter, by field.
fn builtin_template_problems(letter: &Letter) -> Vec<(String, String)> {
    policy::check_default_template(
        &letter.subject,
        &letter.text,
        letter.html.as_deref(),
        &letter.params,
    )
    .into_iter()
    .map(|p| (p.field.to_string(), p.message))
    .collect()
}
