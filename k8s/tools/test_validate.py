#!/usr/bin/env python3
"""Tests of validate.py's ScaledObject and port checks, on a real rendering of the keda overlay: it must
pass as rendered, and each mistake below, made in a copy of it, must fail with its message.
Run by scripts/check-k8s.sh with the .venv interpreter:

    test_validate.py --kubernetes-version 1.31 --root REPO RENDERED-KEDA-OVERLAY.yaml
"""

import argparse
import copy
import sys
import unittest
from pathlib import Path

import yaml

import validate

# Set from the command line before the tests run.
RENDERING = []
VERSION = None
ROOT = None


def find(docs, kind, name):
    return next(d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name)


def trigger(docs, so, name):
    return next(t for t in find(docs, "ScaledObject", so)["spec"]["triggers"] if t.get("name") == name)


def errors_of(docs):
    p = validate.Problems()
    validate.validate_rendering("keda", docs, VERSION, ROOT, p)
    return p.errors


class ScaledObjects(unittest.TestCase):
    def assertFails(self, mutate, *expected):
        docs = copy.deepcopy(RENDERING)
        mutate(docs)
        errors = errors_of(docs)
        for text in expected:
            self.assertTrue(any(text in e for e in errors), f"no error containing {text!r} in {errors}")

    def test_the_rendering_passes(self):
        self.assertEqual(errors_of(copy.deepcopy(RENDERING)), [])

    def test_both_deployments_are_scaled_by_keda_and_no_hpa_is_left(self):
        kinds = {(d["kind"], d["metadata"]["name"]) for d in RENDERING}
        self.assertIn(("ScaledObject", "herald-gateway"), kinds)
        self.assertIn(("ScaledObject", "herald-dispatcher"), kinds)
        self.assertFalse([k for k in kinds if k[0] == "HorizontalPodAutoscaler"])

    def test_misspelt_spec_field(self):
        def mutate(docs):
            spec = find(docs, "ScaledObject", "herald-gateway")["spec"]
            spec["pollingIntervall"] = spec.pop("pollingInterval")
        self.assertFails(mutate, "ScaledObject/herald-gateway: spec: Additional properties are not allowed "
                                 "('pollingIntervall' was unexpected)")

    def test_misspelt_nested_field(self):
        def mutate(docs):
            find(docs, "ScaledObject", "herald-gateway")["spec"]["fallback"]["failureTreshold"] = 4
        self.assertFails(mutate, "'failureTreshold' was unexpected")

    def test_wrong_type(self):
        def mutate(docs):
            find(docs, "ScaledObject", "herald-dispatcher")["spec"]["maxReplicaCount"] = "10"
        self.assertFails(mutate, "spec.maxReplicaCount: '10' is not of type 'integer'")

    def test_misspelt_trigger_metadata(self):
        def mutate(docs):
            meta = trigger(docs, "herald-dispatcher", "jobs-lag")["metadata"]
            meta["lagTreshold"] = meta.pop("lagThreshold")
        self.assertFails(mutate, "nats-jetstream trigger needs metadata.lagThreshold",
                         "nats-jetstream trigger has no metadata.lagTreshold")

    def test_unknown_trigger_type(self):
        def mutate(docs):
            trigger(docs, "herald-dispatcher", "jobs-lag")["type"] = "nats-jetsream"
        self.assertFails(mutate, "trigger type 'nats-jetsream' is not one this check knows")

    def test_target_missing(self):
        def mutate(docs):
            find(docs, "ScaledObject", "herald-dispatcher")["spec"]["scaleTargetRef"]["name"] = "herald-dispatchers"
        self.assertFails(mutate, "scaleTargetRef Deployment 'herald-dispatchers' (apps/v1) is not a Deployment "
                                 "in the rendering")

    def test_leftover_hpa(self):
        def mutate(docs):
            docs.append({
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "herald-gateway-cpu", "namespace": "herald"},
                "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "herald-gateway"},
                         "minReplicas": 3, "maxReplicas": 20},
            })
        self.assertFails(mutate, "HorizontalPodAutoscaler 'herald-gateway-cpu' also scales Deployment "
                                 "'herald-gateway': two autoscalers fight over it")

    def test_two_scaled_objects_on_one_deployment(self):
        def mutate(docs):
            twin = copy.deepcopy(find(docs, "ScaledObject", "herald-gateway"))
            twin["metadata"]["name"] = "herald-gateway-twin"
            twin["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"] = "herald-gateway-twin"
            docs.append(twin)
        self.assertFails(mutate, "Deployment 'herald-gateway' is already scaled by ScaledObject")

    def test_query_not_promql(self):
        def mutate(docs):
            trigger(docs, "herald-gateway", "connections")["metadata"]["query"] = "sum(herald_gateway_connections_open"
        self.assertFails(mutate, "query does not parse as PromQL")

    def test_query_with_several_series(self):
        def mutate(docs):
            trigger(docs, "herald-gateway", "connections")["metadata"]["query"] = \
                'sum by (pod) (herald_gateway_connections_open{namespace="herald"})'
        self.assertFails(mutate, "query may return several series")

    def test_query_on_unregistered_metric(self):
        def mutate(docs):
            trigger(docs, "herald-gateway", "connections")["metadata"]["query"] = \
                'sum(herald_gateway_connections{namespace="herald"})'
        self.assertFails(mutate, "query reads herald_gateway_connections, which the code does not register")

    def test_query_in_another_namespace(self):
        def mutate(docs):
            trigger(docs, "herald-gateway", "connections")["metadata"]["query"] = \
                'sum(herald_gateway_connections_open{namespace="herald-dev"})'
        self.assertFails(mutate, "query selects namespace 'herald-dev', but the ScaledObject is in 'herald'")

    def test_empty_result_must_not_read_as_zero(self):
        def mutate(docs):
            del trigger(docs, "herald-gateway", "connections")["metadata"]["ignoreNullValues"]
        self.assertFails(mutate, 'set ignoreNullValues "false"')

    def test_stream_not_herald_s(self):
        def mutate(docs):
            trigger(docs, "herald-dispatcher", "jobs-lag")["metadata"]["stream"] = "HERALD_JOB"
        self.assertFails(mutate, "stream 'HERALD_JOB' is not one of Herald's with HERALD_PREFIX=herald")

    def test_monitoring_endpoint_with_scheme(self):
        def mutate(docs):
            trigger(docs, "herald-dispatcher", "jobs-lag")["metadata"]["natsServerMonitoringEndpoint"] = \
                "http://nats-headless:8222"
        self.assertFails(mutate, "must be host:port")

    def test_cpu_and_memory_stay(self):
        def mutate(docs):
            spec = find(docs, "ScaledObject", "herald-dispatcher")["spec"]
            spec["triggers"] = [t for t in spec["triggers"] if t["type"] != "memory"]
        self.assertFails(mutate, "needs a memory trigger")

    def test_fallback_within_bounds(self):
        def mutate(docs):
            find(docs, "ScaledObject", "herald-gateway")["spec"]["fallback"]["replicas"] = 30
        self.assertFails(mutate, "fallback.replicas 30 outside 3..20")

    def test_no_scale_to_zero(self):
        def mutate(docs):
            find(docs, "ScaledObject", "herald-dispatcher")["spec"]["minReplicaCount"] = 0
        self.assertFails(mutate, "minReplicaCount must be at least 1")


class Ports(unittest.TestCase):
    """The public and internal ports stay apart (issue 15): probes, Services, scraping, policies."""

    assertFails = ScaledObjects.assertFails

    def test_probe_on_the_public_port(self):
        def mutate(docs):
            container = find(docs, "Deployment", "herald-gateway")["spec"]["template"]["spec"]["containers"][0]
            container["readinessProbe"]["httpGet"]["port"] = "http"
        self.assertFails(mutate, "readinessProbe must use port 'internal'")

    def test_internal_port_on_the_public_service(self):
        def mutate(docs):
            ports = find(docs, "Service", "herald-dispatcher")["spec"]["ports"]
            ports.append({"name": "internal", "port": 8190, "targetPort": "internal", "protocol": "TCP"})
        self.assertFails(mutate, "Service/herald-dispatcher", "targetPort 'internal' in a Service not labelled")

    def test_scraping_the_public_port(self):
        def mutate(docs):
            find(docs, "ServiceMonitor", "herald-gateway")["spec"]["endpoints"][0]["port"] = "http"
        self.assertFails(mutate, "scrapes port 'http': /metrics is on 'internal' only")

    def test_a_job_label_the_service_lacks(self):
        def mutate(docs):
            del find(docs, "Service", "herald-gateway-internal")["metadata"]["labels"]["herald/job"]
        self.assertFails(mutate, "jobLabel 'herald/job' is not a label of Service")

    def test_a_pod_without_a_network_policy(self):
        def mutate(docs):
            docs.remove(find(docs, "NetworkPolicy", "herald-dispatcher"))
        self.assertFails(mutate, "Deployment/herald-dispatcher: no NetworkPolicy selects its pods")

    def test_a_policy_open_to_everyone(self):
        def mutate(docs):
            rules = find(docs, "NetworkPolicy", "herald-gateway")["spec"]["ingress"]
            rules[0]["from"] = [{"namespaceSelector": {}}]
            rules[1]["ports"] = []
        self.assertFails(mutate, "a peer that admits every namespace or address", "names no ports")

    def test_the_public_port_open_to_pods_of_this_namespace(self):
        def mutate(docs):
            rules = find(docs, "NetworkPolicy", "herald-dispatcher")["spec"]["ingress"]
            rules[0]["from"].append({"podSelector": {}})
        self.assertFails(mutate, "the public port is for the ingress controller's namespace only")


def main():
    global VERSION, ROOT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("rendering", type=Path)
    args = parser.parse_args()
    VERSION, ROOT = args.kubernetes_version, args.root
    RENDERING.extend(d for d in yaml.safe_load_all(args.rendering.read_text()) if d)
    result = unittest.main(argv=[sys.argv[0]], exit=False, verbosity=0).result
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
