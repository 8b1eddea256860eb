//! Templates as the template routes show them: the list (`GET /templates`), one template with
//! its builds (`GET /templates/{id}`), and sharing a team's template with every team
//! (`PATCH /templates/{id}`, `PATCH /v2/templates/{id}` with `public`).
//!
//! A team sees its own templates, the built-in ones (no team) and those other teams shared.
//! Of a template it does not own it sees no usage (no builds, `buildCount` 0), as E2B shows
//! other teams' templates; the built-in ones keep the one version their host provides.
//!
//! Sharing and names: a create's `templateID` is looked up as a template the team may use
//! first, and only then as one of the team's snapshots. So a template made public would take
//! the place of another team's snapshot of the same name (or ID) for that team; sharing it is
//! refused (409) while such a snapshot exists. Template names are unique across teams, so no
//! two templates can be public under one name.

use wrenn_api::{
    TemplateBuild, TemplateBuildStatus, TemplateListed, TemplateUpdateRequest,
    TemplateUpdateResponse, TemplateWithBuilds,
};

use crate::error::ApiError;
use crate::service::{ControlPlane, decode_cursor, encode_cursor, now, to_datetime};
use crate::store::{BuildRecord, Cursor, TeamRecord, TemplateEntry};
use crate::templates::status_of;

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("Template '{id}' not found"))
}

fn listed(e: &TemplateEntry, builds: u64, status: TemplateBuildStatus) -> TemplateListed {
    let t = &e.template;
    let names: Vec<String> = t.name.iter().cloned().collect();
    TemplateListed {
        template_id: t.id.clone(),
        build_id: t.build.as_ref().map(|b| b.id.clone()).unwrap_or_default(),
        cpu_count: t.vcpus,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        public: e.public(),
        aliases: names.clone(),
        names,
        created_at: to_datetime(e.created_at),
        updated_at: to_datetime(e.updated_at),
        created_by: None,
        last_spawned_at: None,
        spawn_count: 0,
        build_count: builds,
        envd_version: t.envd_version.clone(),
        build_status: status,
    }
}

/// A build as `GET /templates/{id}` lists it; finished once `ready` or `error`, when it was
/// last written.
fn build_entry(b: &BuildRecord) -> TemplateBuild {
    let status = status_of(b);
    let finished = matches!(
        status,
        TemplateBuildStatus::Ready | TemplateBuildStatus::Error
    );
    TemplateBuild {
        build_id: b.id.clone(),
        status,
        created_at: to_datetime(b.created_at),
        updated_at: to_datetime(b.updated_at),
        finished_at: finished.then(|| to_datetime(b.updated_at)),
        cpu_count: b.vcpus,
        memory_mb: b.memory_mb,
        disk_size_mb: b.disk_size_mb,
        envd_version: b.envd_version.clone(),
    }
}

impl ControlPlane {
    /// `e` as `team` sees it listed.
    async fn listed_for(
        &self,
        team: &TeamRecord,
        e: &TemplateEntry,
    ) -> Result<TemplateListed, ApiError> {
        let t = &e.template;
        if t.name.is_none() {
            // A host's own template: one version, always there.
            return Ok(listed(e, 1, TemplateBuildStatus::Ready));
        }
        let latest = self.store.latest_build(&t.id).await?;
        let status = match (&t.build, latest.as_ref().map(status_of)) {
            // A failed rebuild does not make the template unusable.
            (Some(_), Some(TemplateBuildStatus::Error) | None) => TemplateBuildStatus::Ready,
            (_, Some(s)) => s,
            (None, None) => TemplateBuildStatus::Waiting,
        };
        let builds = if t.team_id.as_ref() == Some(&team.id) {
            self.store.count_builds(&t.id).await?
        } else {
            0
        };
        Ok(listed(e, builds, status))
    }

    /// `GET /templates`: the team's templates and the public ones.
    pub async fn list_templates(&self, team: &TeamRecord) -> Result<Vec<TemplateListed>, ApiError> {
        let mut out = Vec::new();
        for e in self.store.list_templates(&team.id).await? {
            out.push(self.listed_for(team, &e).await?);
        }
        Ok(out)
    }

    /// `GET /templates/{id}` (by ID or name): the template as listed, with a page of at most
    /// `limit` of its builds, newest first, from `next_token` on; the next page's token. Another
    /// team's private template is as unknown as one that does not exist.
    pub async fn template_with_builds(
        &self,
        team: &TeamRecord,
        id: &str,
        next_token: Option<&str>,
        limit: usize,
    ) -> Result<(TemplateWithBuilds, Option<String>), ApiError> {
        let after = next_token.map(decode_cursor).transpose()?;
        let e = self
            .store
            .template_entry(id)
            .await?
            .filter(|e| e.visible_to(&team.id))
            .ok_or_else(|| not_found(id))?;
        let template = self.listed_for(team, &e).await?;
        let (builds, more) = if e.template.team_id.as_ref() == Some(&team.id) {
            self.store
                .list_builds(&e.template.id, after.as_ref(), limit)
                .await?
        } else {
            (Vec::new(), false)
        };
        let next = builds.last().filter(|_| more).map(|b| {
            encode_cursor(&Cursor {
                time: b.created_at.0,
                id: b.id.clone(),
            })
        });
        let builds = builds.iter().map(build_entry).collect();
        Ok((TemplateWithBuilds { template, builds }, next))
    }

    /// `PATCH /templates/{id}` and `PATCH /v2/templates/{id}`: shares the team's template with
    /// every team, or stops; its names. Built-in and other teams' public templates are not the
    /// team's to change (403); what it cannot see is unknown (404).
    pub async fn update_template(
        &self,
        team: &TeamRecord,
        id: &str,
        body: TemplateUpdateRequest,
    ) -> Result<TemplateUpdateResponse, ApiError> {
        let e = self
            .store
            .template_entry(id)
            .await?
            .filter(|e| e.visible_to(&team.id))
            .ok_or_else(|| not_found(id))?;
        match &e.template.team_id {
            None => {
                return Err(ApiError::Forbidden(format!(
                    "Template '{id}' is built in: it cannot be changed"
                )));
            }
            Some(owner) if *owner != team.id => {
                return Err(ApiError::Forbidden(format!(
                    "You don't have access to template '{id}'"
                )));
            }
            Some(_) => {}
        }
        if let Some(public) = body.public.filter(|p| *p != e.shared) {
            if public {
                self.check_shareable(team, &e).await?;
            }
            // Deleted meanwhile: as unknown as it is now.
            if !self
                .store
                .set_template_public(&e.template.id, public, now())
                .await?
            {
                return Err(not_found(id));
            }
            tracing::info!(template_id = %e.template.id, public, "template visibility changed");
        }
        Ok(TemplateUpdateResponse {
            names: e.template.name.iter().cloned().collect(),
        })
    }

    /// Refuses to make `e` public when its ID or name would then mean something else to
    /// another team: a template found under its name first (a host's template of that ID), or
    /// another team's snapshot, which the public template would shadow. A snapshot named so
    /// after the check is no worse off than one named after a built-in template: creates
    /// reach it by its namespaced name, as the SDKs give it.
    async fn check_shareable(&self, team: &TeamRecord, e: &TemplateEntry) -> Result<(), ApiError> {
        let t = &e.template;
        let mut refs = vec![t.id.as_str()];
        if let Some(name) = &t.name {
            if self
                .store
                .find_template(name)
                .await?
                .is_some_and(|other| other.id != t.id)
            {
                return Err(ApiError::Conflict(format!(
                    "Another template is known as '{name}': this one cannot be made public"
                )));
            }
            refs.push(name);
        }
        if self.store.snapshot_known_elsewhere(&team.id, &refs).await? {
            let shown = t.name.as_deref().unwrap_or(&t.id);
            return Err(ApiError::Conflict(format!(
                "Another team uses the name '{shown}' (a snapshot): a public template of that \
                 name would take its place, so this one cannot be made public"
            )));
        }
        Ok(())
    }
}
