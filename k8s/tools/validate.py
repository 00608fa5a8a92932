#!/usr/bin/env python3
"""Validates rendered Herald manifests. Run by scripts/check-k8s.sh with the .venv interpreter.

    validate.py --kubernetes-version 1.31 --root REPO NAME=RENDERED.yaml [NAME=RENDERED.yaml ...]

Per document: the Kubernetes JSON schema of that version, strict (unknown fields are errors), from
the pinned kubernetes-validate package. Kinds without a schema there are errors too, except the
CRDs Herald uses: ServiceMonitor and PrometheusRule get a structural check of the fields they use
(and a PrometheusRule's expressions are parsed as PromQL); a KEDA ScaledObject is checked against
the vendored CRD schema of a pinned KEDA release, strictly, and against what KEDA and Herald
require of its triggers (scaledobjects.py). Then per rendering: references between objects
resolve (a ScaledObject's target exists, and no HPA scales it too), and Herald's own deployment
rules hold (non-root hardening, probes on the internal port, public Services and ServiceMonitors
that keep the internal port apart, a NetworkPolicy on every pod, the gateway's shutdown budget, the ConfigMap covering
every HERALD_* setting the code reads). Finally the Grafana dashboard parses, and every metric it queries should be
registered by the code and mentioned in docs/METRICS.md (warnings: both change in other hands).

Prints nothing and exits 0 when everything passes; otherwise one line per problem and exit 1.
"""

import argparse
import functools
import json
import re
import sys
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

import scaledobjects

SECRET_KEYS = {
    "HERALD_JWT_SECRET",
    "HERALD_JWT_SECRET_PREVIOUS",
    "HERALD_ADMIN_TOKEN",
    "HERALD_PUBLISH_TOKEN",
    "HERALD_READ_TOKEN",
    "HERALD_MONGODB_URI",
}
# Read by the code but deliberately left unset: every process then takes a random id.
UNSET_ON_PURPOSE = {"HERALD_GATEWAY_ID", "HERALD_DISPATCHER_ID"}
# Secrets that the cluster provides rather than the rendering (prod creates it by hand).
EXTERNAL_SECRETS = {"herald-secrets"}
UID = 65532
# The container port of the internal listener (probes, /metrics, the dispatcher's operator API),
# and the label that marks the Services exposing it.
INTERNAL_PORT = "internal"
LISTENER_LABEL = "herald/listener"
# Time a gateway needs after its drain grace: presence clean-up and exit, before SIGKILL.
SHUTDOWN_MARGIN_MS = 1000
DEFAULT_DRAIN_GRACE_MS = 10_000

SERVICE_MONITOR_SPEC_KEYS = {
    "selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
    "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
    "attachMetadata", "scrapeProtocols", "keepDroppedTargets", "scrapeClass",
}
SERVICE_MONITOR_ENDPOINT_KEYS = {
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "honorLabels",
    "honorTimestamps", "trackTimestampsStaleness", "relabelings", "metricRelabelings", "tlsConfig",
    "authorization", "basicAuth", "oauth2", "bearerTokenSecret", "followRedirects", "enableHttp2",
    "filterRunning", "proxyUrl", "noProxy", "proxyFromEnvironment", "proxyConnectHeader",
}
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


class Problems:
    def __init__(self):
        self.errors = []
        self.warnings = []

    def error(self, where, message):
        self.errors.append(f"{where}: {message}")

    def warn(self, where, message):
        self.warnings.append(f"{where}: {message}")


def spec_of(doc):
    """The spec, or {} when it is missing or malformed (the schema check reports that)."""
    spec = doc.get("spec")
    return spec if isinstance(spec, dict) else {}


def ident(doc):
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- per document --------------------------------------------------------------------------------

def check_operator_envelope(doc, where, p):
    """What every Prometheus Operator object Herald ships has: its apiVersion, and no top-level
    field besides apiVersion, kind, metadata and spec."""
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        p.error(where, f"apiVersion {doc.get('apiVersion')!r}, expected monitoring.coreos.com/v1")
    for key in set(doc) - {"apiVersion", "kind", "metadata", "spec"}:
        p.error(where, f"unknown top-level field {key!r}")


def check_service_monitor(doc, where, p, root=None):
    """Structural check for the ServiceMonitor CRD, whose schema kubernetes-validate lacks."""
    check_operator_envelope(doc, where, p)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        p.error(where, "spec missing")
        return
    for key in set(spec) - SERVICE_MONITOR_SPEC_KEYS:
        p.error(where, f"unknown field spec.{key}")
    labels = (spec.get("selector") or {}).get("matchLabels")
    if not isinstance(labels, dict) or not labels or not all(isinstance(v, str) for v in labels.values()):
        p.error(where, "spec.selector.matchLabels must be a non-empty map of strings")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        p.error(where, "spec.endpoints must be a non-empty list")
        return
    for i, ep in enumerate(endpoints):
        at = f"spec.endpoints[{i}]"
        if not isinstance(ep, dict):
            p.error(where, f"{at} must be a map")
            continue
        for key in set(ep) - SERVICE_MONITOR_ENDPOINT_KEYS:
            p.error(where, f"unknown field {at}.{key}")
        if not isinstance(ep.get("port"), str):
            p.error(where, f"{at}.port must name a Service port")
        if "path" in ep and not str(ep["path"]).startswith("/"):
            p.error(where, f"{at}.path must start with /")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not DURATION.match(str(ep[key])):
                p.error(where, f"{at}.{key} {ep[key]!r} is not a duration like 15s")


PROMETHEUS_RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
SEVERITIES = {"critical", "warning", "info"}


@functools.lru_cache(maxsize=None)
def registered_metrics(root):
    """Every herald_* metric name the code registers (shared/, gateway/, dispatcher/)."""
    names = set()
    for crate in ("shared", "gateway", "dispatcher"):
        for path in (root / crate / "src").rglob("*.rs"):
            names |= set(re.findall(r'"(herald_[a-z0-9_]+)"', path.read_text(errors="replace")))
    return names


def check_prometheus_rule(doc, where, p, root=None):
    """Structural check for the PrometheusRule CRD: every rule alerts, its expression parses as
    PromQL (promql-parser, pinned), and every herald_* metric it reads is registered by the code
    (a renamed metric would leave the alert silent forever)."""
    import promql_parser

    check_operator_envelope(doc, where, p)
    groups = spec_of(doc).get("groups")
    if not isinstance(groups, list) or not groups:
        p.error(where, "spec.groups must be a non-empty list")
        return
    registered = registered_metrics(root) if root else set()
    alerts = set()
    for g, group in enumerate(groups):
        rules = group.get("rules") if isinstance(group, dict) else None
        if not isinstance(group, dict) or not group.get("name") or not isinstance(rules, list) or not rules:
            p.error(where, f"spec.groups[{g}] needs a name and a non-empty list of rules")
            continue
        for r, rule in enumerate(rules):
            at = f"{group['name']}[{r}]"
            if not isinstance(rule, dict):
                p.error(where, f"{at} must be a map")
                continue
            for key in set(rule) - PROMETHEUS_RULE_KEYS:
                p.error(where, f"unknown field {at}.{key}")
            name = rule.get("alert")
            if not name or name in alerts:
                p.error(where, f"{at}: alert name missing or repeated ({name!r})")
            alerts.add(name)
            at = f"{at} {name}"
            if "for" in rule and not DURATION.match(str(rule["for"])):
                p.error(where, f"{at}: for {rule['for']!r} is not a duration like 10m")
            if (rule.get("labels") or {}).get("severity") not in SEVERITIES:
                p.error(where, f"{at}: labels.severity must be one of {sorted(SEVERITIES)}")
            annotations = rule.get("annotations") or {}
            if not annotations.get("summary") or not annotations.get("runbook"):
                p.error(where, f"{at}: annotations need a summary and a runbook")
            expr = rule.get("expr")
            try:
                promql_parser.parse(str(expr))
            except Exception as e:  # the parser raises its own error types
                p.error(where, f"{at}: expr does not parse as PromQL: {e}")
                continue
            for metric in set(re.findall(r"\b(herald_[a-z0-9_]+)", str(expr))):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                if registered and metric not in registered and base not in registered:
                    p.error(where, f"{at}: {metric} is not registered by the code")


def check_scaled_object(doc, where, p, root=None):
    scaledobjects.check_scaled_object(doc, where, p, registered_metrics(root) if root else frozenset())


CRD_CHECKS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_service_monitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): check_prometheus_rule,
    (scaledobjects.API_VERSION, "ScaledObject"): check_scaled_object,
}


def check_schema(doc, where, version, p, root):
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        path = ".".join(str(x) for x in e.path) or "(top level)"
        p.error(where, f"{path}: {e.message}")
    except kv.SchemaNotFoundError:
        crd = CRD_CHECKS.get((doc.get("apiVersion"), doc.get("kind")))
        if crd is None:
            p.error(where, f"no schema for apiVersion {doc.get('apiVersion')!r} kind {doc.get('kind')!r} "
                           f"in Kubernetes {version} (a typo, or a CRD this check does not know)")
        else:
            crd(doc, where, p, root)
    except kv.VersionNotSupportedError:
        raise SystemExit(f"kubernetes-validate has no schemas for Kubernetes {version}")


# --- per rendering -------------------------------------------------------------------------------

def containers_of(deploy):
    spec = (spec_of(deploy).get("template") or {}).get("spec") or {}
    return spec, spec.get("containers") or []


def env_sources(container):
    """(kind, name, key or None, optional) for every ConfigMap and Secret a container reads."""
    for src in container.get("envFrom") or []:
        for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if field in src:
                ref = src[field]
                yield kind, ref.get("name"), None, bool(ref.get("optional"))
    for var in container.get("env") or []:
        value_from = var.get("valueFrom") or {}
        for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if field in value_from:
                ref = value_from[field]
                yield kind, ref.get("name"), ref.get("key"), bool(ref.get("optional"))


def check_rendering(name, docs, root, p):
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind"), {})[(doc.get("metadata") or {}).get("name")] = doc
    deployments = by_kind.get("Deployment", {})
    services = by_kind.get("Service", {})
    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})
    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    dockerfile = (root / "Dockerfile").read_text() if (root / "Dockerfile").exists() else ""

    def pod_labels(d):
        return ((spec_of(d).get("template") or {}).get("metadata") or {}).get("labels") or {}

    for dname, d in deployments.items():
        where = f"{name}: Deployment/{dname}"
        pod, containers = containers_of(d)
        if not selects((spec_of(d).get("selector") or {}).get("matchLabels"), pod_labels(d)):
            p.error(where, "spec.selector does not match the pod template's labels")
        sa = pod.get("serviceAccountName")
        if sa and sa not in by_kind.get("ServiceAccount", {}):
            p.error(where, f"serviceAccountName {sa!r} is not in the rendering")
        pod_sc = pod.get("securityContext") or {}
        for c in containers:
            cw = f"{where} container {c.get('name')}"
            sc = c.get("securityContext") or {}

            def eff(key):
                return sc.get(key, pod_sc.get(key))

            if eff("runAsNonRoot") is not True:
                p.error(cw, "runAsNonRoot must be true")
            if eff("runAsUser") != UID:
                p.error(cw, f"runAsUser must be {UID} (the distroless nonroot user)")
            if sc.get("readOnlyRootFilesystem") is not True:
                p.error(cw, "readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                p.error(cw, "allowPrivilegeEscalation must be false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                p.error(cw, "capabilities.drop must contain ALL")
            if ((eff("seccompProfile") or {}).get("type")) != "RuntimeDefault":
                p.error(cw, "seccompProfile must be RuntimeDefault")
            res = c.get("resources") or {}
            if not {"cpu", "memory"} <= set(res.get("requests") or {}) or "memory" not in (res.get("limits") or {}):
                p.error(cw, "needs cpu and memory requests and a memory limit (the HPAs scale on them)")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
                if got != path:
                    p.error(cw, f"{probe} must be httpGet {path}, found {got!r}")
            # Probes are served on the internal listener only; the public port answers them 404.
            if INTERNAL_PORT not in {port.get("name") for port in c.get("ports") or []}:
                p.error(cw, f"needs a container port named {INTERNAL_PORT!r} (HERALD_*_INTERNAL_LISTEN)")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                got = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if c.get(probe) and got != INTERNAL_PORT:
                    p.error(cw, f"{probe} must use port {INTERNAL_PORT!r} (probes are not on the public port), found {got!r}")
            # The runtime image has no shell: exec hooks and probes cannot work.
            for hook in ("preStop", "postStart"):
                if "exec" in ((c.get("lifecycle") or {}).get(hook) or {}):
                    p.error(cw, f"lifecycle.{hook}.exec cannot run: the image has no shell (use sleep)")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if "exec" in (c.get(probe) or {}):
                    p.error(cw, f"{probe}.exec cannot run: the image has no shell")
            for binary in c.get("command") or []:
                if binary.startswith("/") and binary not in dockerfile and binary.rsplit("/", 1)[-1] not in dockerfile:
                    p.error(cw, f"command {binary!r} is not built into the image by the Dockerfile")
            for kind, ref, key, optional in env_sources(c):
                pool = configmaps if kind == "ConfigMap" else secrets
                if ref in pool:
                    data = {**(pool[ref].get("data") or {}), **(pool[ref].get("stringData") or {})}
                    if key is not None and key not in data and not optional:
                        p.error(cw, f"{kind} {ref!r} has no key {key!r}")
                elif not optional and not (kind == "Secret" and ref in EXTERNAL_SECRETS):
                    p.error(cw, f"reads {kind} {ref!r}, which is neither in the rendering nor optional")
        # A Deployment count next to an HPA must lie within the HPA's bounds, or they fight.
        for h in hpas.values():
            if (spec_of(h).get("scaleTargetRef") or {}).get("name") == dname and "replicas" in spec_of(d):
                lo, hi = spec_of(h).get("minReplicas", 1), spec_of(h)["maxReplicas"]
                if not lo <= spec_of(d)["replicas"] <= hi:
                    p.error(where, f"replicas {d['spec']['replicas']} outside its HPA's {lo}..{hi}")

    def deployment_port_names(selector):
        names = set()
        for d in deployments.values():
            if selects(selector, pod_labels(d)):
                for c in containers_of(d)[1]:
                    names |= {port.get("name") for port in c.get("ports") or []}
        return names

    for sname, s in services.items():
        where = f"{name}: Service/{sname}"
        selector = spec_of(s).get("selector")
        if not any(selects(selector, pod_labels(d)) for d in deployments.values()):
            p.error(where, "selector matches no Deployment's pods")
        ports = deployment_port_names(selector)
        internal = ((s.get("metadata") or {}).get("labels") or {}).get(LISTENER_LABEL) == "internal"
        for port in spec_of(s).get("ports") or []:
            target = port.get("targetPort")
            if isinstance(target, str) and target not in ports:
                p.error(where, f"targetPort {target!r} is not a container port name")
            # A public Service (the Ingress's backend) must not expose metrics or the admin API.
            if (target == INTERNAL_PORT) != internal:
                p.error(where, f"targetPort {target!r} in a Service "
                        f"{'labelled' if internal else 'not labelled'} {LISTENER_LABEL}: internal")

    # Every Herald pod is behind a NetworkPolicy: its public port open to the ingress controller's
    # namespace only, its internal port to chosen namespaces (or this one) only, never to all.
    policies = by_kind.get("NetworkPolicy", {})
    for dname, d in deployments.items():
        covering = [(n, np) for n, np in policies.items()
                    if selects((spec_of(np).get("podSelector") or {}).get("matchLabels"), pod_labels(d))]
        if not covering:
            p.error(f"{name}: Deployment/{dname}", "no NetworkPolicy selects its pods")
    for nname, np in policies.items():
        where = f"{name}: NetworkPolicy/{nname}"
        spec = spec_of(np)
        selected = [d for d in deployments.values()
                    if selects((spec.get("podSelector") or {}).get("matchLabels"), pod_labels(d))]
        if not selected:
            p.error(where, "podSelector matches no Deployment's pods")
        if "Ingress" not in (spec.get("policyTypes") or []):
            p.error(where, "policyTypes must include Ingress")
        names = set()
        for d in selected:
            for c in containers_of(d)[1]:
                names |= {port.get("name") for port in c.get("ports") or []}
        for i, rule in enumerate(spec.get("ingress") or []):
            at = f"ingress[{i}]"
            peers = rule.get("from")
            ports = [port.get("port") for port in rule.get("ports") or []]
            if not ports:
                p.error(where, f"{at} names no ports: it would open every port, the internal one too")
            for port in ports:
                if port not in names:
                    p.error(where, f"{at}: port {port!r} is not a container port name of the pods it selects")
            if not peers:
                p.error(where, f"{at} has no `from`: it admits every source")
                continue
            for peer in peers:
                ns, pods = peer.get("namespaceSelector"), peer.get("podSelector")
                if "ipBlock" in peer or (ns is not None and not (ns.get("matchLabels") or ns.get("matchExpressions"))):
                    p.error(where, f"{at}: a peer that admits every namespace or address: {peer}")
                if "http" in ports and (ns is None or pods is not None):
                    p.error(where, f"{at}: the public port is for the ingress controller's namespace only (a namespaceSelector alone)")

    for hname, h in hpas.items():
        ref = spec_of(h).get("scaleTargetRef") or {}
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            p.error(f"{name}: HorizontalPodAutoscaler/{hname}", f"scaleTargetRef {ref} is not in the rendering")
    for pname, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        selector = (spec_of(pdb).get("selector") or {}).get("matchLabels")
        if not any(selects(selector, pod_labels(d)) for d in deployments.values()):
            p.error(f"{name}: PodDisruptionBudget/{pname}", "selector matches no Deployment's pods")
    for iname, ing in by_kind.get("Ingress", {}).items():
        for rule in spec_of(ing).get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                svc = (path.get("backend") or {}).get("service") or {}
                target = services.get(svc.get("name"))
                port = (svc.get("port") or {}).get("name")
                if target is None:
                    p.error(f"{name}: Ingress/{iname}", f"backend Service {svc.get('name')!r} is not in the rendering")
                elif port and port not in {x.get("name") for x in spec_of(target).get("ports") or []}:
                    p.error(f"{name}: Ingress/{iname}", f"backend port {port!r} is not a port of Service {svc.get('name')!r}")
    for mname, sm in by_kind.get("ServiceMonitor", {}).items():
        spec = spec_of(sm)
        selector = (spec.get("selector") or {}).get("matchLabels")
        matched = [s for s in services.values() if selects(selector, (s.get("metadata") or {}).get("labels") or {})]
        if not matched:
            p.error(f"{name}: ServiceMonitor/{mname}", "selector matches no Service's labels")
        job_label = spec.get("jobLabel")
        for s in matched:
            if job_label and job_label not in ((s.get("metadata") or {}).get("labels") or {}):
                p.error(f"{name}: ServiceMonitor/{mname}", f"jobLabel {job_label!r} is not a label of Service {ident(s)}")
        for ep in spec.get("endpoints") or []:
            if ep.get("port") != INTERNAL_PORT:
                p.error(f"{name}: ServiceMonitor/{mname}", f"scrapes port {ep.get('port')!r}: /metrics is on {INTERNAL_PORT!r} only")
            for s in matched:
                if ep.get("port") not in {x.get("name") for x in spec_of(s).get("ports") or []}:
                    p.error(f"{name}: ServiceMonitor/{mname}", f"port {ep.get('port')!r} is not a port of Service {ident(s)}")

    config = next((c for c in (herald_config_of(d, configmaps) for d in deployments.values()) if c is not None), None)
    scaledobjects.check_rendering(name, by_kind, config, p)
    check_config(name, deployments, configmaps, root, p)


def herald_config_of(deployment, configmaps):
    for c in containers_of(deployment)[1]:
        for kind, ref, key, _ in env_sources(c):
            if kind == "ConfigMap" and key is None and ref in configmaps:
                return configmaps[ref].get("data") or {}
    return None


def variables_read_by_code(root):
    """HERALD_* names passed to env readers in the services' code (tests and the CLI excluded),
    and those a TLS setting names (`TlsVars { ca: "HERALD_…", … }` in shared/src/tls.rs)."""
    names = set()
    call = re.compile(
        r"""(?:\b(?:string|optional|required|parse|parse_optional|millis|secs|var|var_os|try_from_env)"""
        r"""(?:::<[^>]*>)?\s*\(\s*|env\s*=\s*|\b(?:ca|cert|key):\s*)"(HERALD_[A-Z0-9_]+)\""""
    )
    for crate in ("shared", "gateway", "dispatcher"):
        for path in sorted((root / crate / "src").rglob("*.rs")):
            if "bin" in path.relative_to(root / crate / "src").parts:
                continue
            text = path.read_text(errors="replace")
            text = text.split("#[cfg(test)]", 1)[0]
            names |= set(call.findall(text))
    return names


def check_config(name, deployments, configmaps, root, p):
    gateway = deployments.get("herald-gateway")
    config = None
    for d in deployments.values():
        config = herald_config_of(d, configmaps)
        if config is not None:
            break
    if config is None:
        p.error(name, "no Deployment loads a ConfigMap with envFrom")
        return
    for key in sorted(SECRET_KEYS & set(config)):
        p.error(f"{name}: ConfigMap", f"{key} is a secret and must come from the herald-secrets Secret")
    wanted = variables_read_by_code(root) - SECRET_KEYS - UNSET_ON_PURPOSE
    for key in sorted(wanted - set(config)):
        p.error(f"{name}: ConfigMap", f"{key} is read by the code but missing from k8s/base/config.env")

    if gateway is None:
        p.error(name, "no herald-gateway Deployment")
        return
    pod, containers = containers_of(gateway)
    grace_ms = int(pod.get("terminationGracePeriodSeconds", 30)) * 1000
    drain_ms = int(config.get("HERALD_DRAIN_GRACE_MS") or DEFAULT_DRAIN_GRACE_MS)
    for c in containers:
        sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds")
        if not sleep:
            p.error(f"{name}: Deployment/herald-gateway", "needs a preStop sleep so the endpoint goes before the drain")
            continue
        need = int(sleep) * 1000 + drain_ms + SHUTDOWN_MARGIN_MS
        if grace_ms < need:
            p.error(f"{name}: Deployment/herald-gateway",
                    f"terminationGracePeriodSeconds {grace_ms // 1000} s is shorter than preStop sleep {sleep} s + "
                    f"HERALD_DRAIN_GRACE_MS {drain_ms} ms + {SHUTDOWN_MARGIN_MS} ms to exit: SIGKILL would cut the drain")


# --- dashboard -----------------------------------------------------------------------------------

def check_dashboard(root, p):
    path = root / "k8s" / "dashboards" / "herald.json"
    where = "k8s/dashboards/herald.json"
    try:
        dash = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        p.error(where, f"not valid JSON: {e}")
        return
    panels = dash.get("panels")
    if not isinstance(panels, list) or not panels:
        p.error(where, "has no panels")
        return
    metrics = set()
    ids = set()
    for panel in panels:
        pid = panel.get("id")
        if pid in ids:
            p.error(where, f"duplicate panel id {pid}")
        ids.add(pid)
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets or not all(t.get("expr") for t in targets):
            p.error(where, f"panel {panel.get('title')!r} has a target without an expr")
        for t in targets:
            metrics |= set(re.findall(r"\b(herald_[a-z0-9_]+)", t.get("expr", "")))
    # Warnings, not errors: the metrics and their document change in other hands; this says
    # where the dashboard has fallen behind without blocking them.
    registered = registered_metrics(root)
    doc = root / "docs" / "METRICS.md"
    text = doc.read_text(errors="replace") if doc.exists() else None
    for metric in sorted(metrics):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        if registered and metric not in registered and base not in registered:
            p.warn(where, f"{metric} is not registered by the code (shared/, gateway/, dispatcher/)")
        if text is not None and metric not in text and base not in text:
            p.warn(where, f"{metric} is not mentioned in docs/METRICS.md: keep the dashboard in sync")


def validate_rendering(name, docs, version, root, p):
    """Every check of one overlay's rendered documents (test_validate.py calls this too)."""
    if not docs:
        p.error(name, "rendered nothing")
        return
    for doc in docs:
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind") \
                or not (doc.get("metadata") or {}).get("name"):
            p.error(name, f"document without apiVersion, kind or metadata.name: {str(doc)[:80]}")
            continue
        check_schema(doc, f"{name}: {ident(doc)}", version, p, root)
    check_rendering(name, [d for d in docs if isinstance(d, dict)], root, p)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("renderings", nargs="+", metavar="NAME=FILE")
    args = parser.parse_args()

    p = Problems()
    for arg in args.renderings:
        name, _, file = arg.partition("=")
        try:
            docs = [d for d in yaml.safe_load_all(Path(file).read_text()) if d]
        except yaml.YAMLError as e:
            p.error(name, f"rendered YAML does not parse: {e}")
            continue
        validate_rendering(name, docs, args.kubernetes_version, args.root, p)
    check_dashboard(args.root, p)

    for w in p.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in p.errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if p.errors else 0


if __name__ == "__main__":
    sys.exit(main())
