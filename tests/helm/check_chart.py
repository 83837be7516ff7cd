"""The Helm chart, checked with the real Helm engine (helm-python-sdk: Helm's
Go SDK) and the Kubernetes 1.31 schemas (kubernetes-validate --strict).

usage: check_chart.py WORKSPACE KEYBROKER_BIN DEV_DIR

For the default values and a matrix of value sets it lints, renders,
validates every manifest, checks the objects structurally (the container's
args, ports, probes and mounted paths agree with the configuration the
ConfigMap holds), and runs `keybroker serve --check-config` on that
configuration. Wrong values must be refused by values.schema.json with a
message naming them. The Dockerfile must agree with the chart. Prints one
line per check; exits non-zero on the first failure.
"""

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import helm_python
import yaml

WORKSPACE, KEYBROKER, DEV = sys.argv[1], sys.argv[2], sys.argv[3]
CHART = os.path.join(WORKSPACE, "helm", "keybroker")
EXAMPLE = os.path.join(WORKSPACE, "helm", "examples", "app-with-sidecar")
KUBE = "1.31.0"
CHECKS = 0


def ok(what):
    global CHECKS
    CHECKS += 1
    print(f"ok  {what}")


def fail(what):
    print(f"FAIL {what}", file=sys.stderr)
    sys.exit(1)


def expect(cond, what):
    if not cond:
        fail(what)


def render(chart_dir, values, name="kb", namespace="keys"):
    chart = helm_python.Chart.load(chart_dir)
    try:
        return chart.render(values, name=name, namespace=namespace, is_install=True)
    finally:
        chart.close()


def objects(rendered):
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((path, doc))
    return out


def validate(rendered, label):
    docs = [yaml.safe_dump(doc) for _, doc in objects(rendered)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("---\n".join(docs))
    r = subprocess.run(["kubernetes-validate", "-k", KUBE, "--strict", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("ERROR")]
    expect(r.returncode == 0 and not errors, f"{label}: Kubernetes {KUBE} schemas: {errors or r.stderr}")
    ok(f"{label}: {len(docs)} manifests validate against the Kubernetes {KUBE} schemas (strict)")


def find(objs, kind, name_part=""):
    return [d for _, d in objs if d.get("kind") == kind and name_part in d["metadata"]["name"]]


def one(objs, kind, label):
    found = find(objs, kind)
    expect(len(found) == 1, f"{label}: expected one {kind}, found {len(found)}")
    return found[0]


def keybroker_config(objs, label):
    cm = [d for d in find(objs, "ConfigMap") if "keybroker.toml" in d.get("data", {})]
    expect(len(cm) == 1, f"{label}: one ConfigMap with keybroker.toml")
    text = cm[0]["data"]["keybroker.toml"]
    return cm[0], text, tomllib.loads(text)


def mounted(container, volumes, path):
    """The volume mounted at the longest prefix of `path`, if any."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]["mountPath"]):
                best = (m, volumes.get(m["name"]))
    return best


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check_pod(pod_spec, container, cfg, cm, label, values, sidecar_app=None):
    """The container agrees with the configuration it is given."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    # Args: the binary's real command line.
    expect(container["args"][:2] == ["serve", "--config"], f"{label}: args {container['args']}")
    config_path = container["args"][2]
    env = {e["name"]: e for e in container.get("env", [])}
    expect(env["KEYBROKER_CONFIG"]["value"] == config_path, f"{label}: KEYBROKER_CONFIG")
    m = mounted(container, volumes, config_path)
    expect(m and "configMap" in m[1] and m[1]["configMap"]["name"] == cm["metadata"]["name"]
           and os.path.basename(config_path) == "keybroker.toml",
           f"{label}: the configuration file is the ConfigMap's keybroker.toml")
    # Every path the configuration names is mounted from the right volume.
    paths = [cfg["tls"]["cert"], cfg["tls"]["key"], cfg["tls"]["client_ca"]]
    paths += [cfg["tls"]["crl"]] if "crl" in cfg["tls"] else []
    if cfg["store"]["type"] == "sqlite":
        paths.append(cfg["store"]["path"])
    if "file" in cfg.get("audit", {}):
        paths.append(cfg["audit"]["file"])
    if "sealed_file" in cfg.get("root_key", {}):
        paths.append(cfg["root_key"]["sealed_file"])
    if "unix_socket" in cfg:
        paths.append(cfg["unix_socket"]["path"])
    if "xks" in cfg:
        paths += [cfg["xks"]["cert"], cfg["xks"]["key"]]
    if "kms_v2" in cfg:
        paths.append(cfg["kms_v2"]["socket"])
    for p in paths:
        m = mounted(container, volumes, p)
        expect(m is not None and m[1] is not None, f"{label}: {p} is on no volume")
    ok(f"{label}: every path of the configuration is mounted ({len(paths)} paths)")
    # Ports and probes.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expect(ports["grpc"] == port_of(cfg["listen"]), f"{label}: grpc port vs listen")
    expect(ports["health"] == port_of(cfg["health_listen"]), f"{label}: health port vs health_listen")
    if "metrics" in cfg:
        expect(ports.get("metrics") == port_of(cfg["metrics"]["listen"]), f"{label}: metrics port vs metrics.listen")
    else:
        expect("metrics" not in ports, f"{label}: a metrics port without the listener")
    for probe, service in [("livenessProbe", "keybroker.liveness"), ("readinessProbe", "")]:
        grpc = container[probe]["grpc"]
        expect(grpc["port"] == ports["health"] and grpc["service"] == service, f"{label}: {probe} {grpc}")
    ok(f"{label}: ports and native gRPC probes match the listeners")
    # Hardening.
    psc, sc = pod_spec.get("securityContext", {}), container["securityContext"]
    expect(psc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True, f"{label}: runAsNonRoot")
    expect(sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem")
    expect(sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: capabilities")
    expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label}: seccomp")
    res = container["resources"]
    expect(res.get("requests") and res.get("limits"), f"{label}: resources")
    ok(f"{label}: non-root, read-only root, no capabilities, seccomp RuntimeDefault, requests and limits")
    # Secrets reach the process through the environment the binary reads.
    backends = cfg.get("backends", {"local": {"type": "local"}})
    if any(b["type"] == "local" for b in backends.values()) and "root_key" not in cfg:
        expect("secretKeyRef" in env["KEYBROKER_ROOT_KEY"]["valueFrom"], f"{label}: root key from a Secret")
    if cfg["store"]["type"] == "postgres":
        expect("secretKeyRef" in env["KEYBROKER_STORE_URL"]["valueFrom"], f"{label}: database URL from a Secret")
    for name, b in backends.items():
        if b["type"] == "pkcs11":
            expect(b["pin_env"] in env, f"{label}: the PIN variable {b['pin_env']} is set")
    if sidecar_app is not None:
        m = mounted(sidecar_app, volumes, cfg["unix_socket"]["path"])
        expect(m is not None and "emptyDir" in m[1], f"{label}: the app container shares the socket directory")
        socket_env = [e["value"] for e in sidecar_app.get("env", []) if e["name"] == "KEYBROKER_SOCKET"]
        expect(socket_env == ["unix://" + cfg["unix_socket"]["path"]], f"{label}: the app dials the socket")
        uid = sidecar_app["securityContext"]["runAsUser"]
        expect(f"uid:{uid}" in cfg["auth"]["app_identities"], f"{label}: the app's uid is an application identity")
        expect(pod_spec["securityContext"].get("fsGroup") is not None and cfg["unix_socket"]["mode"] == "0660",
               f"{label}: the socket is shared through the pod's fsGroup")
        ok(f"{label}: the application reaches the sidecar over the socket as uid:{uid}")
    return env


def check_config_accepted(text, env_from, label):
    """`keybroker serve --check-config` accepts the rendered configuration,
    with the mount points mapped onto real files."""
    root = tempfile.mkdtemp(prefix="kb-chart-")
    mapped = text
    for prefix in ["/etc/keybroker", "/var/lib/keybroker", "/run/keybroker"]:
        mapped = mapped.replace(prefix, root + prefix)
    os.makedirs(root + "/etc/keybroker/tls")
    shutil.copy(f"{DEV}/tls/server.pem", root + "/etc/keybroker/tls/tls.crt")
    shutil.copy(f"{DEV}/tls/server.key", root + "/etc/keybroker/tls/tls.key")
    shutil.copy(f"{DEV}/tls/ca.pem", root + "/etc/keybroker/tls/ca.crt")
    os.makedirs(root + "/etc/keybroker/client-ca")
    shutil.copy(f"{DEV}/tls/ca.pem", root + "/etc/keybroker/client-ca/ca.crt")
    for d in ["/var/lib/keybroker", "/run/keybroker", "/etc/keybroker/crl", "/etc/keybroker/root-key",
              "/etc/keybroker/config", "/var/run/kmsplugin"]:
        os.makedirs(root + d, exist_ok=True)
    mapped = mapped.replace("/var/run/kmsplugin", root + "/var/run/kmsplugin")
    os.makedirs(root + "/etc/keybroker/xks")
    shutil.copy(f"{DEV}/tls/server.pem", root + "/etc/keybroker/xks/tls.crt")
    shutil.copy(f"{DEV}/tls/server.key", root + "/etc/keybroker/xks/tls.key")
    path = root + "/etc/keybroker/config/keybroker.toml"
    with open(path, "w") as f:
        f.write(mapped)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    # The Secrets the pod's environment names, with stand-in values.
    for name in env_from:
        env[name] = {"KEYBROKER_STORE_URL": "postgres://kb:pw@db:5432/kb",
                     "KEYBROKER_ROOT_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}.get(
                         name, "stand-in-secret-of-forty-three-characters-or-more")
    env.pop("KEYBROKER_CONFIG", None)
    r = subprocess.run([KEYBROKER, "serve", "--check-config", path], capture_output=True, text=True, env=env)
    expect(r.returncode == 0, f"{label}: keybroker serve --check-config refused the ConfigMap's configuration:\n{r.stderr}")
    ok(f"{label}: keybroker serve --check-config accepts the ConfigMap's configuration")
    shutil.rmtree(root)


def standalone(values, label, extra_checks=None):
    rendered = render(CHART, values)
    validate(rendered, label)
    objs = objects(rendered)
    cm, text, cfg = keybroker_config(objs, label)
    dep = one(objs, "Deployment", label)
    pod = dep["spec"]["template"]["spec"]
    container = [c for c in pod["containers"] if c["name"] == "keybroker"][0]
    env = check_pod(pod, container, cfg, cm, label, values)
    check_config_accepted(text, [e for e in env if e != "KEYBROKER_CONFIG"], label)
    svc = one(objs, "Service", label)
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    expect(svc_ports["grpc"] == port_of(cfg["listen"]), f"{label}: Service grpc port")
    np = find(objs, "NetworkPolicy")
    if values.get("networkPolicy", {}).get("enabled", True):
        expect(len(np) == 1, f"{label}: a NetworkPolicy")
        grpc_rule = [r for r in np[0]["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"])][0]
        expect(grpc_rule["from"][0]["podSelector"]["matchLabels"] == {"keybroker.io/client": "true"},
               f"{label}: only labelled client pods reach the gRPC port")
    helm_test = [d for _, d in objs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    expect(len(helm_test) == 1 and "grpc.health.v1.Health/Check" in helm_test[0]["spec"]["containers"][0]["args"]
           and "-cert" in helm_test[0]["spec"]["containers"][0]["args"], f"{label}: a helm test calling Health over mTLS")
    notes = rendered.get("keybroker/templates/NOTES.txt", "")
    expect("grpcurl" in notes and "port-forward" in notes, f"{label}: NOTES.txt has the grpcurl command")
    ok(f"{label}: Service, NetworkPolicy, helm test and NOTES.txt")
    if extra_checks:
        extra_checks(objs, cfg, dep)
    return objs, cfg


def main():
    lint = helm_python.lint(CHART, strict=True, kube_version="v" + KUBE)
    expect(not lint["errors"] and all(m["severity"] < 3 for m in lint["messages"]), f"helm lint: {lint}")
    ok(f"helm lint --strict (Kubernetes {KUBE}): {len(lint['messages'])} messages, no errors")

    # The chart's alert rules are deploy/'s.
    with open(os.path.join(CHART, "files", "keybroker-alerts.yaml")) as a, \
            open(os.path.join(WORKSPACE, "deploy", "prometheus", "keybroker-alerts.yaml")) as b:
        expect(a.read() == b.read(), "helm/keybroker/files/keybroker-alerts.yaml differs from deploy/prometheus/")
    ok("the chart's alert rules are deploy/prometheus/keybroker-alerts.yaml")

    def default_checks(objs, cfg, dep):
        expect(dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate", "default: one replica")
        expect(len(find(objs, "PersistentVolumeClaim")) == 1, "default: the SQLite file on a PVC")
        expect(cfg["admin_identities" if False else "auth"]["admin_identities"]
               == ["spiffe://cluster.local/ns/keys/sa/kb-keybroker-admin"], "default: the admin identity")
    standalone({}, "default values", default_checks)

    def fleet_checks(objs, cfg, dep):
        expect(dep["spec"]["replicas"] == 3 and "strategy" not in dep["spec"], "fleet: 3 replicas, rolling")
        pdb = one(objs, "PodDisruptionBudget", "fleet")
        expect(pdb["spec"]["minAvailable"] == 1, "fleet: PDB")
        pod = dep["spec"]["template"]["spec"]
        expect(pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone", "fleet: spread")
        expect("podAntiAffinity" in pod["affinity"], "fleet: anti-affinity")
        expect(not find(objs, "PersistentVolumeClaim"), "fleet: no PVC")
        expect(cfg["store"] == {"type": "postgres", "pool_size": 8}, f"fleet: store {cfg['store']}")
    standalone({"replicaCount": 3, "store": {"type": "postgres", "postgres": {"urlSecret": {"name": "kb-db", "key": "url"}}},
                "auth": {"adminIdentities": ["spiffe://prod/admin"], "appIdentities": ["spiffe://prod/app"]}},
               "fleet on PostgreSQL", fleet_checks)

    def aws_checks(objs, cfg, dep):
        sa = one(objs, "ServiceAccount", "aws")
        expect(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::"), "aws: IRSA")
        expect(cfg["backends"]["aws"] == {"type": "aws-kms", "region": "eu-west-1", "timeout_ms": 2000}, f"{cfg['backends']}")
        expect(cfg["root_key"]["sealed_by"] == "aws", "aws: root key sealed by KMS")
    standalone({"backends": {"local": {"type": "local"}, "aws": {"type": "aws-kms", "region": "eu-west-1", "timeoutMs": 2000}},
                "defaultBackend": "aws",
                "rootKey": {"sealed": {"enabled": True, "secretName": "kb-sealed", "by": "aws",
                                       "byKey": "arn:aws:kms:eu-west-1:111122223333:key/1234"}},
                "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/kb"}},
                "auth": {"adminIdentities": ["spiffe://prod/admin"]}}, "AWS KMS with IRSA, sealed root key", aws_checks)

    standalone({"backends": {"hsm": {"type": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so", "tokenLabel": "kb",
                                     "pinSecret": {"name": "hsm-pin", "key": "pin"}}},
                "defaultBackend": "hsm", "aws": {"credentialsSecret": "aws-creds"},
                "auth": {"adminIdentities": ["spiffe://prod/admin"]}}, "PKCS#11 HSM")

    standalone({"tls": {"secretName": "srv", "clientCaSecretName": "clients-ca", "crlSecretName": "clients-crl"},
                "auth": {"certificateIdentities": ["uri", "spki-sha256"], "adminIdentities": ["spiffe://prod/admin"]},
                "policy": {"roles": {"payments": {"payments-*": ["Wrap", "Unwrap"]}, "ops": {"*": ["admin"]}},
                           "identities": {"spiffe://prod/payments": ["payments"], "uid:1000": ["ops"]}},
                "audit": {"toFile": True}, "limits": {"perIdentityRate": 500}},
               "TLS from Secrets with a CRL, policy, audit file")

    def cm_checks(objs, cfg, dep):
        cert = one(objs, "Certificate", "cert-manager")
        expect(cert["spec"]["secretName"] == "keybroker-tls" and cert["spec"]["issuerRef"]["name"] == "ca-issuer",
               "cert-manager: the Certificate writes the TLS Secret")
        expect("kb-keybroker.keys.svc" in cert["spec"]["dnsNames"], "cert-manager: the Service name")
    standalone({"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca-issuer"}}}}, "TLS from cert-manager", cm_checks)

    def mon_checks(objs, cfg, dep):
        sm = one(objs, "ServiceMonitor", "monitoring")
        expect(sm["spec"]["endpoints"][0]["port"] == "metrics", "monitoring: ServiceMonitor")
        rule = one(objs, "PrometheusRule", "monitoring")
        with open(os.path.join(WORKSPACE, "deploy", "prometheus", "keybroker-alerts.yaml")) as f:
            expect(rule["spec"]["groups"] == yaml.safe_load(f)["groups"], "monitoring: the PrometheusRule holds the alerts")
        expect(cfg["telemetry"]["otlp_endpoint"] == "http://otel:4317", "monitoring: OTLP")
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        expect(env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and env["OTEL_TRACES_SAMPLER_ARG"] == "0.1",
               "monitoring: sampler variables")
    standalone({"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
                "telemetry": {"otlpEndpoint": "http://otel:4317", "sampler": "parentbased_traceidratio", "samplerArg": "0.1"}},
               "metrics, ServiceMonitor, PrometheusRule and OTLP on", mon_checks)

    standalone({"metrics": {"enabled": False}, "networkPolicy": {"enabled": False}}, "metrics off")

    def doors_checks(objs, cfg, dep):
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expect(ports["xks"] == port_of(cfg["xks"]["listen"]), "xks: the container port is the listener's")
        svc = one(objs, "Service", "doors")
        expect(any(p["name"] == "xks" for p in svc["spec"]["ports"]), "xks: the Service port")
        env = {e["name"]: e for e in container["env"]}
        for c in cfg["xks"]["prefixes"][0]["credentials"]:
            ref = env[c["secret_access_key_env"]]["valueFrom"]["secretKeyRef"]
            expect(ref["name"].startswith("xks-"), f"xks: the secret access key from a Secret: {ref}")
        host = [v for v in pod["volumes"] if v["name"] == "keybroker-kms-v2"][0]["hostPath"]
        expect(host["path"] == "/etc/kubernetes/kms", "kms v2: the socket on the host for the API server")
        expect(cfg["kms_v2"]["key"] == "k8s-secrets" and cfg["policy"]["identities"]["uid:0"] == ["ops", "keybroker-kms-v2"],
               f"kms v2: the API server's uid may use the key: {cfg['policy']}")
        expect(cfg["policy"]["roles"]["keybroker-kms-v2"] == {"k8s-secrets": ["Wrap", "Unwrap"]}, "kms v2: the role")
    standalone({"xks": {"enabled": True, "tlsSecretName": "xks-tls", "authorizePrincipals": True,
                        "prefixes": [{"path": "/keystores/orders", "requestsPerSecond": 1800, "credentials": [
                            {"accessKeyId": "AKIAXKSORDERSCURRENTAA", "secretName": "xks-orders-current"},
                            {"accessKeyId": "AKIAXKSORDERSNEXTAAAAA", "secretName": "xks-orders-next"}]}]},
                "kmsV2": {"enabled": True, "hostPath": "/etc/kubernetes/kms"},
                "policy": {"roles": {"ops": {"*": ["read"]}}, "identities": {"uid:0": ["ops"]}},
                "auth": {"adminIdentities": ["spiffe://prod/admin"]}},
               "XKS and KMS v2 listeners", doors_checks)

    # Sidecar: the example application chart, with this chart as a dependency.
    tmp = tempfile.mkdtemp(prefix="kb-helm-")
    shutil.copytree(os.path.join(WORKSPACE, "helm"), os.path.join(tmp, "helm"))
    example = os.path.join(tmp, "helm", "examples", "app-with-sidecar")
    helm_python.dependency_update(example)
    lint = helm_python.lint(example, strict=True, kube_version="v" + KUBE)
    expect(not lint["errors"], f"example lint: {lint}")
    rendered = render(example, {}, name="shop", namespace="orders")
    validate(rendered, "sidecar example")
    objs = objects(rendered)
    expect(not find(objs, "Service") and len(find(objs, "Deployment")) == 1, "sidecar: only the application's Deployment")
    cm, text, cfg = keybroker_config(objs, "sidecar example")
    dep = one(objs, "Deployment", "sidecar example")
    pod = dep["spec"]["template"]["spec"]
    kb = [c for c in pod["containers"] if c["name"] == "keybroker"][0]
    app = [c for c in pod["containers"] if c["name"] != "keybroker"][0]
    env = check_pod(pod, kb, cfg, cm, "sidecar example", {}, sidecar_app=app)
    expect(cfg["listen"].startswith("127.0.0.1:"), "sidecar: mTLS only on the pod's loopback")
    check_config_accepted(text, [e for e in env if e != "KEYBROKER_CONFIG"], "sidecar example")
    shutil.rmtree(tmp)

    # Wrong values are refused by the schema, naming them.
    for values, needle in [
        ({"replicaCount": "three"}, "replicaCount"),
        ({"backends": {"vault": {"type": "vault"}}}, "type"),
        ({"unknownSetting": True}, "unknownSetting"),
        ({"mode": "daemonset"}, "mode"),
        ({"grpc": {"port": 70000}}, "port"),
        ({"auth": {"adminIdentities": ["billing"]}}, "adminIdentities"),
        ({"backends": {"hsm": {"type": "pkcs11", "module": "/x.so"}}}, "pinSecret"),
        ({"xks": {"prefixes": [{"credentials": [{"accessKeyId": "lowercase", "secretName": "s"}]}]}}, "accessKeyId"),
    ]:
        try:
            render(CHART, values)
        except helm_python.HelmError as e:
            expect(needle in str(e), f"the refusal of {values} does not name {needle!r}: {e}")
            ok(f"refused {values}: {str(e).splitlines()[0][:150]}")
            continue
        fail(f"the chart accepted {values}")
    # Rules a schema cannot say, refused by the templates.
    for values, needle in [
        ({"replicaCount": 2}, "needs store.type postgres"),
        ({"store": {"type": "postgres"}}, "urlSecret"),
        ({"defaultBackend": "aws"}, "defaultBackend"),
    ]:
        try:
            render(CHART, values)
        except helm_python.HelmError as e:
            expect(needle in str(e), f"the refusal of {values} does not name {needle!r}: {e}")
            ok(f"refused {values}: {needle}")
            continue
        fail(f"the chart accepted {values}")

    # The Dockerfile agrees with the chart.
    with open(os.path.join(WORKSPACE, "Dockerfile")) as f:
        docker = f.read()
    final = docker.split("\nFROM ")[-1]
    values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    user = re.search(r"^USER (\d+):(\d+)$", final, re.M)
    expect(user and int(user[1]) == values["podSecurityContext"]["runAsUser"]
           and int(user[2]) == values["podSecurityContext"]["runAsGroup"], "Dockerfile USER vs the chart's runAsUser")
    exposed = sorted(int(p) for p in re.search(r"^EXPOSE (.+)$", final, re.M)[1].split())
    expect(exposed == sorted([values["grpc"]["port"], values["health"]["port"], values["metrics"]["port"]]),
           f"Dockerfile EXPOSE {exposed} vs the chart's ports")
    import json
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", final, re.M)[1])
    cmd = json.loads(re.search(r"^CMD (.+)$", final, re.M)[1])
    _, _, default_cfg = keybroker_config(objects(render(CHART, {})), "dockerfile")
    dep = one(objects(render(CHART, {})), "Deployment", "dockerfile")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    expect(entry == ["/usr/local/bin/keybroker"] and "command" not in container, "Dockerfile ENTRYPOINT is the binary the chart runs")
    expect(cmd == container["args"], f"Dockerfile CMD {cmd} vs the chart's args {container['args']}")
    env_cfg = re.search(r"^ENV KEYBROKER_CONFIG=(\S+)$", final, re.M)[1]
    expect(env_cfg == container["args"][2], "Dockerfile KEYBROKER_CONFIG vs the chart's config path")
    copies = re.findall(r"^COPY (.+)$", final, re.M)
    expect(final.startswith("scratch") and sorted(copies) == sorted([
        "--from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt",
        "--from=build /out/keybroker /usr/local/bin/keybroker"]), f"the final image holds only the binary and the CA certificates: {copies}")
    bases = [b for b in re.findall(r"^FROM (\S+)", docker, re.M) if b != "scratch"]
    expect(bases and all(re.search(r":[0-9]+\.[0-9]+\.[0-9]+", b) for b in bases) and "latest" not in docker,
           f"base images are pinned to versions: {bases}")
    ok("the Dockerfile agrees with the chart (user, ports, entrypoint, args, config path)")
    print(f"{CHECKS} checks passed")


main()
