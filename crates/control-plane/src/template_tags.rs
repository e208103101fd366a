//! Template tags: names for ready builds of a template, used as `name:tag`.

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::store::{BuildStatus, TagAssignment};
use crate::template_models::{
    AssignTemplateTagsRequest, AssignedTemplateTags, AssignmentsQuery, DeleteTemplateTagsRequest, TagGroupsQuery,
    TemplateTag, TemplateTagAssignment, TemplateTagAssignmentsResponse, TemplateTagExistsResponse, TemplateTagGroup,
    TemplateTagGroupsResponse,
};
use crate::template_names;
use crate::ControlPlane;

/// Default and maximum page sizes of the tag listings.
const DEFAULT_ASSIGNMENT_LIMIT: i64 = 6;
const DEFAULT_TAGS_LIMIT: i64 = 25;
const MAX_PAGE: i64 = 100;

impl ControlPlane {
    /// Points `tags` at the build that `target` (`name:tag` or `name`) names.
    pub(crate) async fn assign_tags(&self, body: AssignTemplateTagsRequest) -> Result<AssignedTemplateTags, ApiError> {
        let tags = checked_tags(&body.tags)?;
        let template = self.find_template_or_404(&body.target).await?;
        if template.status != BuildStatus::Ready {
            return Err(ApiError::bad_request(format!(
                "invalid target {:?}: the build it names is not ready (status {})",
                body.target, template.status
            )));
        }
        self.store().assign_tags(&template.template_id, &template.build_id, &tags).await?;
        tracing::info!(template_id = %template.template_id, build_id = %template.build_id, tags = ?tags, "template tags assigned");
        Ok(AssignedTemplateTags { tags, build_id: template.build_id.to_string() })
    }

    /// Removes tags from a template. Returns 404, removing nothing, when one of them does not exist.
    pub(crate) async fn delete_tags(&self, body: DeleteTemplateTagsRequest) -> Result<(), ApiError> {
        let tags = checked_tags(&body.tags)?;
        let template = self.find_template_or_404(&body.name).await?;
        let missing = self.store().delete_tags(&template.template_id, &tags).await?;
        if !missing.is_empty() {
            return Err(ApiError::not_found(format!(
                "template {:?} has no tags {missing:?}; no tag was removed",
                body.name
            )));
        }
        tracing::info!(template_id = %template.template_id, tags = ?tags, "template tags removed");
        Ok(())
    }

    /// Lists a template's tags.
    pub(crate) async fn list_tags(&self, reference: &str) -> Result<Vec<TemplateTag>, ApiError> {
        let template = self.find_template_or_404(reference).await?;
        let tags = self.store().list_tags(&template.template_id).await?;
        Ok(tags
            .into_iter()
            .map(|tag| TemplateTag { tag: tag.tag, build_id: tag.build_id.to_string(), created_at: tag.assigned_at })
            .collect())
    }

    /// Returns whether a template has a tag, after normalising it (trimmed, lowercase).
    pub(crate) async fn tag_exists(&self, reference: &str, tag: &str) -> Result<TemplateTagExistsResponse, ApiError> {
        let normalized = tag.trim().to_lowercase();
        template_names::check_tag("tag", &normalized)?;
        let template = self.find_template_or_404(reference).await?;
        let exists = self.store().tagged_build(&template.template_id, &normalized).await?.is_some();
        Ok(TemplateTagExistsResponse { exists, normalized_tag: normalized })
    }

    /// Lists one tag's assignments, newest first, a page at a time.
    pub(crate) async fn tag_assignments(
        &self,
        reference: &str,
        tag: &str,
        query: AssignmentsQuery,
    ) -> Result<TemplateTagAssignmentsResponse, ApiError> {
        template_names::check_tag("tag", tag)?;
        let limit = page_size("limit", query.limit, DEFAULT_TAGS_LIMIT)?;
        let offset = cursor_offset("cursor", query.cursor.as_deref())?;
        let template = self.find_template_or_404(reference).await?;
        let assignments = self.store().tag_assignments(&template.template_id, tag).await?;
        if assignments.is_empty() {
            return Err(ApiError::not_found(format!("template {reference:?} has no tag {tag:?}")));
        }
        let (page, next) = paginate(assignments, offset, limit);
        Ok(TemplateTagAssignmentsResponse {
            data: page.into_iter().map(assignment).collect(),
            next_cursor: next.map(|offset| offset.to_string()),
        })
    }

    /// Lists a template's tags with their latest assignments.
    pub(crate) async fn tag_groups(
        &self,
        reference: &str,
        query: TagGroupsQuery,
    ) -> Result<TemplateTagGroupsResponse, ApiError> {
        let assignment_limit = page_size("assignmentLimit", query.assignment_limit, DEFAULT_ASSIGNMENT_LIMIT)?;
        let tags_limit = page_size("tagsLimit", query.tags_limit, DEFAULT_TAGS_LIMIT)?;
        let offset = cursor_offset("tagsCursor", query.tags_cursor.as_deref())?;
        let sort = query.sort.as_deref().unwrap_or("latest_desc");
        if !matches!(sort, "latest_desc" | "latest_asc" | "name_asc" | "name_desc") {
            return Err(ApiError::bad_request(format!(
                "invalid sort {sort:?}: expected latest_desc, latest_asc, name_asc or name_desc"
            )));
        }
        let template = self.find_template_or_404(reference).await?;

        let mut tags = self.store().list_tags(&template.template_id).await?;
        if let Some(search) = query.search.as_deref().map(str::to_lowercase) {
            tags.retain(|tag| tag.tag.contains(&search));
        }
        match sort {
            "latest_asc" => tags.sort_by(|a, b| a.assigned_at.cmp(&b.assigned_at).then(a.tag.cmp(&b.tag))),
            "name_asc" => tags.sort_by(|a, b| a.tag.cmp(&b.tag)),
            "name_desc" => tags.sort_by(|a, b| b.tag.cmp(&a.tag)),
            _ => tags.sort_by(|a, b| b.assigned_at.cmp(&a.assigned_at).then(a.tag.cmp(&b.tag))),
        }

        let (page, next) = paginate(tags, offset, tags_limit);
        let mut groups = Vec::with_capacity(page.len());
        for tag in page {
            let assignments = self.store().tag_assignments(&template.template_id, &tag.tag).await?;
            let has_more = assignments.len() > assignment_limit;
            groups.push(TemplateTagGroup {
                tag: tag.tag,
                assignments: assignments.into_iter().take(assignment_limit).map(assignment).collect(),
                has_more,
            });
        }
        Ok(TemplateTagGroupsResponse { tags: groups, next_cursor: next.map(|offset| offset.to_string()) })
    }
}

fn checked_tags(tags: &[String]) -> Result<Vec<String>, ApiError> {
    if tags.is_empty() {
        return Err(ApiError::bad_request("invalid tags: the list is empty"));
    }
    let mut checked: Vec<String> = Vec::with_capacity(tags.len());
    for tag in tags {
        template_names::check_tag("tags", tag)?;
        if !checked.contains(tag) {
            checked.push(tag.clone());
        }
    }
    Ok(checked)
}

fn page_size(field: &str, value: Option<i64>, default: i64) -> Result<usize, ApiError> {
    let value = value.unwrap_or(default);
    if !(1..=MAX_PAGE).contains(&value) {
        return Err(ApiError::bad_request(format!("invalid {field} {value}: expected 1 to {MAX_PAGE}")));
    }
    Ok(value as usize)
}

/// Reads a cursor, which is the offset of the page's first item.
fn cursor_offset(field: &str, cursor: Option<&str>) -> Result<usize, ApiError> {
    match cursor {
        None | Some("") => Ok(0),
        Some(cursor) => cursor.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid {field} {cursor:?}: pass the nextCursor of the previous page"),
            )
        }),
    }
}

/// Returns the page of `items` at `offset` and the offset of the next page, if any.
pub(crate) fn paginate<T>(items: Vec<T>, offset: usize, limit: usize) -> (Vec<T>, Option<usize>) {
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(offset).take(limit).collect();
    let next = (offset + page.len() < total).then_some(offset + page.len());
    (page, next)
}

fn assignment(record: TagAssignment) -> TemplateTagAssignment {
    TemplateTagAssignment {
        assignment_id: record.assignment_id,
        build_id: record.build_id.to_string(),
        assigned_at: record.assigned_at,
        build_created_at: record.build_created_at,
        build_finished_at: record.build_finished_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paginate_pages_and_ends() {
        assert_eq!(paginate(vec![1, 2, 3], 0, 2), (vec![1, 2], Some(2)));
        assert_eq!(paginate(vec![1, 2, 3], 2, 2), (vec![3], None));
        assert_eq!(paginate(Vec::<i32>::new(), 0, 2), (vec![], None));
    }
}
