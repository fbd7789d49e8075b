// Validation of Kubernetes objects against the API's OpenAPI schemas, offline: the
// kubernetes-models package ships them as compiled validators. Those validators accept unknown
// fields, which `kubectl apply` rejects (strict field validation) and which hide typos such as
// `readinessProb:`; so the object is also walked through a Proxy that records every property
// the validator looks at, and any property it never looked at is reported as unknown.

/** Validation errors of one object (an empty array when it is valid). */
export async function validateK8sObject(object) {
  const { apiVersion, kind } = object ?? {};
  if (typeof apiVersion !== "string" || typeof kind !== "string") {
    return ["apiVersion and kind must be strings"];
  }
  let model;
  try {
    const module = await import(`kubernetes-models/${apiVersion}`);
    model = module[kind];
  } catch {
    return [`no schema for apiVersion ${apiVersion}`];
  }
  if (typeof model !== "function" || model.kind !== kind) {
    return [`no schema for ${apiVersion} ${kind}`];
  }

  const seen = new WeakMap();
  const proxies = new WeakMap();
  const track = (value) => {
    if (value === null || typeof value !== "object") return value;
    if (proxies.has(value)) return proxies.get(value);
    if (!seen.has(value)) seen.set(value, new Set());
    const keys = seen.get(value);
    const proxy = new Proxy(value, {
      get(target, key, receiver) {
        if (typeof key === "string") keys.add(key);
        return track(Reflect.get(target, key, receiver));
      },
      has(target, key) {
        if (typeof key === "string") keys.add(key);
        return Reflect.has(target, key);
      },
    });
    proxies.set(value, proxy);
    return proxy;
  };

  const errors = [];
  try {
    // The model's validate() checks `this`: run it on the tracked object itself.
    model.prototype.validate.call(track(object));
  } catch (e) {
    errors.push(e.message);
  }
  const walk = (value, where) => {
    if (value === null || typeof value !== "object") return;
    const keys = seen.get(value);
    for (const [key, child] of Object.entries(value)) {
      const at = Array.isArray(value) ? `${where}[${key}]` : `${where}.${key}`;
      if (!Array.isArray(value) && !keys?.has(key)) {
        errors.push(`${at}: unknown field "${key}"`);
      } else {
        walk(child, at);
      }
    }
  };
  walk(object, `${kind}/${object.metadata?.name ?? "?"}`);
  return errors;
}
