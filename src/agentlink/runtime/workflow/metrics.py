"""The workflow engine's Prometheus metrics, read at every scrape of its host."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from agentlink.runtime.workflow.engine import FAILED, SUCCEEDED, WorkflowEngine


def engine_metrics(engine: WorkflowEngine) -> Iterator[Metric]:
    counts, seconds = engine.stats.snapshot()
    yield SummaryMetricFamily("agentlink_workflow_init_seconds",
                              "From a run request to the workflow recorded (acknowledged) and "
                              "its first steps queued", count_value=counts["started"],
                              sum_value=seconds["started"])
    yield CounterMetricFamily("agentlink_workflows_resumed",
                              "Workflows taken over from a replica that died, or this one "
                              "before a restart", value=counts["resumed"])
    finished = CounterMetricFamily("agentlink_workflows_finished", "Workflows ended, by outcome",
                                   labels=["outcome"])
    steps = CounterMetricFamily("agentlink_workflow_steps", "Workflow steps ended, by outcome",
                                labels=["outcome"])
    for outcome in (SUCCEEDED, FAILED):
        finished.add_metric([outcome], counts[f"finished_{outcome}"])
        steps.add_metric([outcome], counts[f"steps_{outcome}"])
    yield finished
    yield steps
    yield SummaryMetricFamily("agentlink_workflow_duration_seconds",
                              "From creation to the end, of workflows ended here",
                              count_value=counts["finished_succeeded"] + counts["finished_failed"],
                              sum_value=seconds["finished_succeeded"] + seconds["finished_failed"])
    yield CounterMetricFamily("agentlink_workflow_step_retries",
                              "Step attempts retried after a failure", value=counts["retries"])
    yield CounterMetricFamily("agentlink_workflow_step_waits",
                              "Steps that found their idempotency key's first run still going",
                              value=counts["waits_in_progress"])
    yield GaugeMetricFamily("agentlink_workflows_owned", "Workflows this replica runs now",
                            value=engine.owned())
    yield GaugeMetricFamily("agentlink_workflow_steps_queued",
                            "Steps waiting for their agent's concurrency limit or a backoff",
                            value=sum(engine.scheduler.queued().values()))
    yield GaugeMetricFamily("agentlink_workflow_steps_running", "Steps being called now",
                            value=sum(engine.scheduler.running().values()))
    yield GaugeMetricFamily("agentlink_workflow_agents_throttled",
                            "Agents whose machines are all under pressure: run one at a time",
                            value=len(engine.scheduler.throttled))
