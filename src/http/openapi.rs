//! The API's OpenAPI 3.1 document, built from the same `#[utoipa::path]` annotations that
//! register the routes (`utoipa_axum::routes!`), so a route cannot exist without being
//! described. Served, without the token, at `GET /openapi.json`.

use std::collections::BTreeSet;

use axum::Extension;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};

use super::error::Problem;

/// The serialised document, shared by every request.
#[derive(Clone)]
pub struct Document(pub Bytes);

/// The name of the bearer-token security scheme.
const BEARER: &str = "bearer";

/// The document's fixed parts: title, version, the security scheme, the problem schema.
pub fn base() -> OpenApi {
    let mut doc = utoipa::openapi::OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("letterbox")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Self-hosted newsletter delivery runner. Every /v1 route needs \
                     `Authorization: Bearer TOKEN`; errors are RFC 9457 problem+json.",
                ))
                .build(),
        )
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    // The problem schema and the ones it uses (the field errors).
    let mut schemas = vec![(
        <Problem as utoipa::ToSchema>::name().into_owned(),
        <Problem as utoipa::PartialSchema>::schema(),
    )];
    <Problem as utoipa::ToSchema>::schemas(&mut schemas);
    components.schemas.extend(schemas);
    doc
}

/// Finishes the document once every route is in: operations under `public` need no
/// token, every other one needs the bearer token and may answer 401; every operation's
/// other failures are problem+json (the `default` response).
/// A send's `transport` is one of the names this server was configured with: only
/// known at start, so written into the document then.
pub fn describe_transports(document: &mut serde_json::Value, names: Vec<String>) {
    let transport = document
        .pointer_mut("/components/schemas/SendRequest/properties/transport")
        .and_then(|t| t.as_object_mut());
    if let Some(transport) = transport {
        let mut values: Vec<serde_json::Value> = names.into_iter().map(Into::into).collect();
        values.push(serde_json::Value::Null);
        transport.insert("enum".into(), values.into());
    }
}

pub fn finish(doc: &mut OpenApi, public: &BTreeSet<String>) {
    let problem = ResponseBuilder::new()
        .description("An error, as RFC 9457 problem+json")
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build();
    for (path, item) in doc.paths.paths.iter_mut() {
        let is_public = public.contains(path);
        for operation in operations(item) {
            // OpenAPI requires a description on every response (client generators
            // refuse a document without): where the annotation gave none, the
            // status's own name.
            for (status, response) in operation.responses.responses.iter_mut() {
                if let utoipa::openapi::RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    response.description = status
                        .parse::<u16>()
                        .ok()
                        .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("Success")
                        .to_string();
                }
            }
            operation
                .responses
                .responses
                .entry("default".into())
                .or_insert_with(|| problem.clone().into());
            if is_public {
                operation.security = Some(Vec::new());
            } else {
                operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                operation
                    .responses
                    .responses
                    .entry("401".into())
                    .or_insert_with(|| {
                        let mut unauthorized = problem.clone();
                        unauthorized.description = "The token is missing or wrong".into();
                        unauthorized.into()
                    });
            }
        }
    }
}

fn operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn serve(Extension(Document(doc)): Extension<Document>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc)
}
