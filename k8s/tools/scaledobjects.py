"""Checks of KEDA ScaledObjects, for validate.py: the document against the CRD schema of a pinned
KEDA release, what KEDA's admission webhook and scalers would refuse, and Herald's own rules.
Rendering-wide references (the target Deployment, HPAs beside it) are checked here too; the
Kubernetes objects themselves are validate.py's.

The schema is KEDA's own CRD file, vendored unchanged (schemas/, its git blob id checked on
load). A CRD schema sets no `additionalProperties: false`; the API server rejects unknown fields
of such a structural schema under `kubectl apply`'s strict field validation, so this adds it to
every object schema that lists its properties. Trigger metadata is a free map of strings in the
CRD; which keys a trigger type takes comes from that release's scalers (TRIGGERS below).
"""

import hashlib
import math
import re
from pathlib import Path

import jsonschema
import promql_parser
import yaml

KEDA_VERSION = "v2.18.3"
SCHEMA_FILE = Path(__file__).parent / "schemas" / f"keda-{KEDA_VERSION}-scaledobjects.yaml"
# `git rev-parse v2.18.3:config/crd/bases/keda.sh_scaledobjects.yaml` in kedacore/keda.
SCHEMA_BLOB = "843fab36ed685bb480220b306ffb9305d4c4ed77"
API_VERSION = "keda.sh/v1alpha1"
MAX_NAME = 63  # the ScaledObject's and its HPA's names are label values

# Metadata keys per trigger type, from KEDA v2.18.3's pkg/scalers (the `keda:"name=..."` tags).
# Required: what KEDA needs, plus what it would silently default to a value wrong for Herald
# (nats-jetstream's lagThreshold defaults to 10). Only the types Herald uses are known.
TRIGGERS = {
    "nats-jetstream": {
        "required": {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"},
        "optional": {"accountID", "activationLagThreshold", "useHttps"},
    },
    "prometheus": {
        "required": {"serverAddress", "query", "threshold"},
        "optional": {"activationThreshold", "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl",
                     "awsRegion", "timeout", "identityOwner", "authModes", "queryParameters"},
    },
    "cpu": {"required": {"value"}, "optional": {"containerName"}},
    "memory": {"required": {"value"}, "optional": {"containerName"}},
}
RESOURCE_TRIGGERS = {"cpu", "memory"}
# Aggregations that can return several series even without grouping.
MULTI_SERIES_AGGREGATIONS = {"topk", "bottomk", "count_values", "limitk", "limit_ratio"}
SINGLE_SERIES_FUNCTIONS = {"scalar", "vector", "time"}
INTEGER = re.compile(r"^[0-9]+$")


class SchemaFileError(Exception):
    pass


_validator = None


def strict(schema):
    """A copy of a CRD's structural schema in which every object that lists its properties
    rejects any other (as strict field validation does), except where the CRD preserves unknown
    fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validator():
    global _validator
    if _validator is None:
        try:
            raw = SCHEMA_FILE.read_bytes()
        except OSError as e:
            raise SchemaFileError(f"cannot read {SCHEMA_FILE}: {e}")
        blob = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
        if blob != SCHEMA_BLOB:
            raise SchemaFileError(f"{SCHEMA_FILE.name} is not KEDA {KEDA_VERSION}'s CRD (git blob {blob}, "
                                  f"expected {SCHEMA_BLOB}); vendor it unchanged (k8s/tools/schemas/README.md)")
        crd = yaml.safe_load(raw)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
        schema = strict(version["schema"]["openAPIV3Schema"])
        checker = jsonschema.FormatChecker()

        @checker.checks("int32")
        def int32(value):
            return not isinstance(value, int) or -2**31 <= value < 2**31

        # An OpenAPI v3.0 subset; draft 4's keywords are the ones it shares.
        _validator = jsonschema.Draft4Validator(schema, format_checker=checker)
    return _validator


def _spec(doc):
    spec = doc.get("spec")
    return spec if isinstance(spec, dict) else {}


def _number(text):
    try:
        value = float(str(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def single_series(expr):
    """Whether a PromQL expression yields at most one series: KEDA's prometheus scaler fails
    on a result of several."""
    kind = type(expr).__name__
    if kind == "ParenExpr":
        return single_series(expr.expr)
    if kind in ("NumberLiteral", "StringLiteral"):
        return True
    if kind == "AggregateExpr":
        modifier = expr.modifier
        grouped = modifier is not None and (str(modifier.type).endswith("Without") or list(modifier.labels))
        return str(expr.op) not in MULTI_SERIES_AGGREGATIONS and not grouped
    if kind == "Call":
        return expr.func.name in SINGLE_SERIES_FUNCTIONS
    if kind == "BinaryExpr":
        return single_series(expr.lhs) and single_series(expr.rhs)
    if kind == "UnaryExpr":
        return single_series(expr.expr)
    return False


def label_values(expr, label):
    """Every value an equality matcher in `expr` requires of `label`."""
    values = set()

    def visit(node):
        matchers = getattr(node, "matchers", None)
        for m in getattr(matchers, "matchers", None) or []:
            if m.name == label and str(m.op).endswith("Equal") and not str(m.op).endswith("NotEqual"):
                values.add(m.value)

    promql_parser.walk(expr, visit)
    return values


# --- per document --------------------------------------------------------------------------------

def check_scaled_object(doc, where, p, registered=frozenset()):
    """One ScaledObject on its own: the schema, then what KEDA would refuse, then Herald's rules.
    `registered` holds the herald_* metrics the code registers (empty: not checked)."""
    if doc.get("apiVersion") != API_VERSION:
        p.error(where, f"apiVersion {doc.get('apiVersion')!r}, expected {API_VERSION}")
    if "status" in doc:
        p.error(where, "status is written by KEDA, not by a manifest")
    meta = doc.get("metadata") or {}
    for key in set(meta) - {"name", "namespace", "labels", "annotations"}:
        p.error(where, f"metadata.{key} does not belong in a manifest")
    for key in ("labels", "annotations"):
        if not all(isinstance(v, str) for v in (meta.get(key) or {}).values()):
            p.error(where, f"metadata.{key} values must be strings")
    try:
        v = validator()
    except SchemaFileError as e:
        p.error(where, str(e))
        return
    schema_errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    for e in schema_errors:
        path = ".".join(str(x) for x in e.absolute_path) or "(top level)"
        p.error(where, f"{path}: {e.message} (KEDA {KEDA_VERSION} CRD schema)")
    if schema_errors:
        return

    spec = _spec(doc)
    name = meta.get("name", "")
    hpa = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("name") or f"keda-hpa-{name}"
    if len(name) > MAX_NAME or len(hpa) > MAX_NAME:
        p.error(where, f"the name and the HPA name ({hpa!r}) must be at most {MAX_NAME} characters")

    # As KEDA's admission webhook (apis/keda/v1alpha1/scaledobject_webhook.go).
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if lo > hi:
        p.error(where, f"minReplicaCount {lo} is above maxReplicaCount {hi}")
    if "idleReplicaCount" in spec and spec["idleReplicaCount"] >= lo:
        p.error(where, f"idleReplicaCount {spec['idleReplicaCount']} must be below minReplicaCount {lo}")
    triggers = spec.get("triggers") or []
    if not triggers:
        p.error(where, "spec.triggers is empty")
    names = [t.get("name") for t in triggers if t.get("name")]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        p.error(where, f"trigger name {dup!r} is used twice")
    fallback = spec.get("fallback")
    if fallback is not None and not any(
            t.get("type") not in RESOURCE_TRIGGERS and t.get("metricType", "AverageValue") == "AverageValue"
            for t in triggers):
        p.error(where, "fallback needs a trigger other than cpu/memory with metricType AverageValue")

    for i, trigger in enumerate(triggers):
        check_trigger(trigger, f"{where} trigger {trigger.get('name') or i}", p, registered, fallback is not None)

    # Herald's rules. Neither service scales to zero: gateways hold sockets, and dispatchers run
    # the sweeper and keep consumers alive.
    if lo < 1:
        p.error(where, "minReplicaCount must be at least 1 (Herald's services do not scale to zero)")
    if fallback is None:
        p.error(where, "needs a fallback: without one, a metrics source that fails freezes the count "
                       "at whatever the other triggers say")
    elif not lo <= fallback["replicas"] <= hi:
        p.error(where, f"fallback.replicas {fallback['replicas']} outside {lo}..{hi}")
    types = {t.get("type") for t in triggers}
    for kind in sorted(RESOURCE_TRIGGERS - types):
        p.error(where, f"needs a {kind} trigger: the HPAs' CPU and memory targets stay as the fallback")
    if not types - RESOURCE_TRIGGERS:
        p.error(where, "has only cpu/memory triggers: use the plain HPA of the base instead")


def check_trigger(trigger, where, p, registered, has_fallback):
    kind = trigger.get("type")
    known = TRIGGERS.get(kind)
    if known is None:
        p.error(where, f"trigger type {kind!r} is not one this check knows ({', '.join(sorted(TRIGGERS))}): "
                       f"a typo, or add its metadata keys to TRIGGERS from KEDA {KEDA_VERSION}'s scaler")
        return
    meta = trigger.get("metadata") or {}
    for key in sorted(known["required"] - set(meta)):
        p.error(where, f"{kind} trigger needs metadata.{key}")
    for key in sorted(set(meta) - known["required"] - known["optional"]):
        p.error(where, f"{kind} trigger has no metadata.{key} (KEDA {KEDA_VERSION} ignores it)")
    if trigger.get("useCachedMetrics") and kind in RESOURCE_TRIGGERS:
        p.error(where, f"useCachedMetrics is not supported for {kind} triggers")
    metric_type = trigger.get("metricType")

    if kind in RESOURCE_TRIGGERS:
        if metric_type not in ("Utilization", "AverageValue"):
            p.error(where, f"{kind} trigger needs metricType Utilization or AverageValue, found {metric_type!r}")
        value = str(meta.get("value", ""))
        if metric_type == "Utilization" and (not INTEGER.match(value) or not 0 < int(value) <= 100):
            p.error(where, f"value {value!r} must be a whole percentage of the requests, 1 to 100")
        return

    if metric_type not in (None, "AverageValue", "Value"):
        p.error(where, f"metricType {metric_type!r} must be AverageValue or Value")
    if has_fallback and metric_type not in (None, "AverageValue"):
        p.error(where, "the fallback only works with metricType AverageValue (the default)")
    if kind == "nats-jetstream":
        for key in ("lagThreshold", "activationLagThreshold"):
            if key in meta and not INTEGER.match(str(meta[key])):
                p.error(where, f"{key} {meta[key]!r} must be a whole number")
        if INTEGER.match(str(meta.get("lagThreshold", ""))) and int(meta["lagThreshold"]) < 1:
            p.error(where, "lagThreshold must be positive")
        endpoint = str(meta.get("natsServerMonitoringEndpoint", ""))
        if "://" in endpoint or "/" in endpoint:
            p.error(where, f"natsServerMonitoringEndpoint {endpoint!r} must be host:port (KEDA adds the "
                           f"scheme from useHttps and the /jsz path)")
        if "useHttps" in meta and str(meta["useHttps"]) not in ("true", "false"):
            p.error(where, f"useHttps {meta['useHttps']!r} must be \"true\" or \"false\"")
    elif kind == "prometheus":
        for key in ("threshold", "activationThreshold"):
            if key in meta and _number(meta[key]) is None:
                p.error(where, f"{key} {meta[key]!r} is not a number")
        threshold = _number(meta.get("threshold", ""))
        if threshold is not None and threshold <= 0:
            p.error(where, "threshold must be positive")
        if not re.match(r"^https?://", str(meta.get("serverAddress", ""))):
            p.error(where, f"serverAddress {meta.get('serverAddress')!r} must be an http:// or https:// URL")
        ignore_null = str(meta.get("ignoreNullValues", "true"))
        if ignore_null not in ("true", "false"):
            p.error(where, f"ignoreNullValues {ignore_null!r} must be \"true\" or \"false\"")
        elif has_fallback and ignore_null == "true":
            p.error(where, "set ignoreNullValues \"false\": otherwise an empty result (Prometheus lost the "
                           "targets) reads as 0 and scales in, and the fallback never starts")
        query = meta.get("query")
        if query is None:
            return
        try:
            expr = promql_parser.parse(str(query))
        except Exception as e:  # the parser raises its own error types
            p.error(where, f"query does not parse as PromQL: {e}")
            return
        if not single_series(expr):
            p.error(where, "query may return several series (KEDA fails on that): aggregate without "
                           "`by`/`without`, e.g. sum(...)")
        for metric in sorted(set(re.findall(r"\b(herald_[a-z0-9_]+)", str(query)))):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            if registered and metric not in registered and base not in registered:
                p.error(where, f"query reads {metric}, which the code does not register")


# --- per rendering -------------------------------------------------------------------------------

def stream_names(prefix):
    """Herald's stream names for a HERALD_PREFIX, as shared/src/naming.rs makes them."""
    upper = prefix.upper().replace("-", "_")
    return {f"{upper}_JOBS", f"{upper}_EVENTS"}


# The durable consumer of both streams (shared/src/naming.rs: jobs_consumer, events_consumer).
CONSUMER = "dispatchers"


def check_rendering(name, by_kind, config, p):
    """ScaledObjects against the rest of one rendering. `by_kind` maps kind -> name -> document;
    `config` is the herald ConfigMap's data (or None)."""
    deployments = by_kind.get("Deployment", {})
    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    owner = {}
    for sname, so in sorted(by_kind.get("ScaledObject", {}).items()):
        where = f"{name}: ScaledObject/{sname}"
        try:
            if not validator().is_valid(so):
                continue  # check_scaled_object has said why; the fields below may be any shape
        except SchemaFileError:
            continue
        spec = _spec(so)
        ref = spec.get("scaleTargetRef") or {}
        kind, api = ref.get("kind", "Deployment"), ref.get("apiVersion", "apps/v1")
        target = ref.get("name")
        deployment = deployments.get(target) if (kind, api) == ("Deployment", "apps/v1") else None
        if deployment is None:
            p.error(where, f"scaleTargetRef {kind} {target!r} ({api}) is not a Deployment in the rendering")
            continue
        if target in owner:
            p.error(where, f"Deployment {target!r} is already scaled by ScaledObject {owner[target]!r}")
        owner[target] = sname
        for hname, h in sorted(hpas.items()):
            if (_spec(h).get("scaleTargetRef") or {}).get("name") == target:
                p.error(where, f"HorizontalPodAutoscaler {hname!r} also scales Deployment {target!r}: two "
                               f"autoscalers fight over it (delete it in the overlay; KEDA makes its own)")
        hpa_name = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("name")
        if hpa_name and hpa_name in hpas:
            p.error(where, f"its HPA name {hpa_name!r} is taken by an HPA in the rendering")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        replicas = _spec(deployment).get("replicas")
        if replicas is not None and not lo <= replicas <= hi:
            p.error(where, f"Deployment {target!r} sets replicas {replicas}, outside {lo}..{hi}")
        pod = (_spec(deployment).get("template") or {}).get("spec") or {}
        namespace = (so.get("metadata") or {}).get("namespace")
        for i, trigger in enumerate(spec.get("triggers") or []):
            tw = f"{where} trigger {trigger.get('name') or i}"
            meta = trigger.get("metadata") or {}
            if trigger.get("type") in RESOURCE_TRIGGERS:
                # As KEDA's webhook: a resource trigger needs that request on the containers.
                for c in pod.get("containers") or []:
                    if meta.get("containerName") not in (None, c.get("name")):
                        continue
                    if trigger["type"] not in ((c.get("resources") or {}).get("requests") or {}):
                        p.error(tw, f"container {c.get('name')!r} of {target!r} has no {trigger['type']} request")
            elif trigger.get("type") == "nats-jetstream" and config is not None:
                prefix = config.get("HERALD_PREFIX") or "herald"
                if meta.get("stream") not in stream_names(prefix):
                    p.error(tw, f"stream {meta.get('stream')!r} is not one of Herald's with HERALD_PREFIX={prefix} "
                                f"({', '.join(sorted(stream_names(prefix)))})")
                if meta.get("consumer") != CONSUMER:
                    p.error(tw, f"consumer {meta.get('consumer')!r} is not Herald's durable consumer {CONSUMER!r}")
            elif trigger.get("type") == "prometheus" and namespace:
                try:
                    expr = promql_parser.parse(str(meta.get("query")))
                except Exception:  # reported by check_scaled_object
                    continue
                for value in sorted(label_values(expr, "namespace") - {namespace}):
                    p.error(tw, f"query selects namespace {value!r}, but the ScaledObject is in {namespace!r}")
