"""Approvals of a release for a gated environment, as `codemind approve` and the demo record them."""

from __future__ import annotations


def approve_release(db, intent_name: str, environment: str, by: str) -> str:
    """Record an approval of the latest release; the promotion sensor does the rest."""
    from codemind_dagster.domain.intent import Intent

    row = db.intent_row(intent_name)
    if row is None:
        raise ValueError(f"no intent named {intent_name!r}")
    promo = Intent.model_validate(row.spec).spec.promotion
    if environment not in promo.require_approval:
        raise ValueError(f"{intent_name} does not require approval for {environment} "
                         f"(require_approval: {promo.require_approval or 'none'})")
    release = db.latest_release(intent_name)
    if release is None:
        raise ValueError(f"{intent_name} has no release yet; nothing to approve")
    new = db.approve(intent_name, environment, release.artifact, by)
    verb = "approved" if new else "already approved"
    return f"{verb}: {intent_name} release {release.artifact[:12]} for {environment} (by {by})"
