"""Schemathesis hooks for the run against gpt-serve (`SCHEMATHESIS_HOOKS`): a request the schema
allows must be accepted, except for the rules across fields that no JSON Schema states, which the
served schema names by their error `code` (`gpt2np.serve.openapi.CROSS_FIELD`). It stands in for
the built-in `positive_data_acceptance` on /v1/completions, and is as strict everywhere else."""

import schemathesis

from gpt2np.serve.openapi import CROSS_FIELD


@schemathesis.check
def positive_data_acceptance_or_cross_field_rule(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code < 400:
        return None
    if response.status_code in (401, 404, 429) or response.status_code >= 500:  # the built-in check's own
        return None
    code = response.json().get("error", {}).get("code") if response.status_code == 400 else None
    if code in CROSS_FIELD:
        return None
    raise AssertionError(f"a request the schema allows got {response.status_code}: {response.text[:500]} "
                         f"[{meta.phase.name} {meta.generation.mode} {meta.components}]")
