"""The executor of multi-step runs per profile: in-process locally, a Kubernetes Job per step in k8s."""

from __future__ import annotations

import dagster as dg

from codemind_dagster.settings import Settings


@dg.executor(
    name="k8s_step_jobs",
    config_schema={"max_concurrent": dg.Field(int, is_required=False, default_value=2,
                                              description="Step Jobs of one run at a time.")},
    requirements=dg.multiple_process_executor_requirements(),
)
def k8s_step_jobs(init_context: dg.InitExecutorContext):
    """dagster-k8s's k8s_job_executor, imported when a run starts rather than whenever definitions load."""
    from dagster_k8s import k8s_job_executor

    # Everything else (image, namespace, service account, env, kubeconfig) comes from the K8sRunLauncher.
    config = {"retries": {"enabled": {}}, **init_context.executor_config}
    return k8s_job_executor.executor_creation_fn(init_context._replace(executor_def=k8s_job_executor,
                                                                       executor_config=config))


def executor_for(s: Settings) -> dg.ExecutorDefinition:
    """Steps share a process where a process per step costs more than the step; on k8s each gets its own pod."""
    return k8s_step_jobs if s.profile == "k8s" else dg.in_process_executor
