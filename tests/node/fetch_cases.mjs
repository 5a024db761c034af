// Runs redirect cases with Node's built-in fetch through an HTTP proxy.
// usage: node fetch_cases.mjs PROXY_URL < cases.json   (CA via NODE_EXTRA_CA_CERTS)
// Each case: {id, url, method, body|null, headers}. Prints one JSON line per case:
// {id, status, error} -- status of the final response, or the error that ended it.
import { ProxyAgent, setGlobalDispatcher } from "undici";

// The global dispatcher is shared with the fetch built into Node, so this routes
// Node's own fetch (not undici's copy) through the proxy.
setGlobalDispatcher(new ProxyAgent(process.argv[2]));

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const cases = JSON.parse(Buffer.concat(chunks).toString("utf8"));

for (const c of cases) {
  const init = { method: c.method, redirect: "follow", signal: AbortSignal.timeout(15000),
                 headers: { ...(c.headers || {}) } };
  if (c.body !== null) {
    init.body = c.body;
    init.headers["content-type"] = "application/x-www-form-urlencoded";
  }
  try {
    const response = await fetch(c.url, init);
    await response.arrayBuffer();
    console.log(JSON.stringify({ id: c.id, status: response.status, error: null }));
  } catch (err) {
    console.log(JSON.stringify({ id: c.id, status: null, error: String(err && err.cause ? err.cause : err) }));
  }
}
