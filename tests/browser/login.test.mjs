// Acceptance 3 of the people/apps issue: in a real browser (headless Chromium driven by
// Playwright), a patient signs in on phivault's pages with password + TOTP, approves the
// app's scopes, and the authorization code lands at the app's redirect URI; the app then
// exchanges it (PKCE S256) and reads the patient's record with the token — a DPoP-bound
// token (RFC 9449), its proofs made with Node's own crypto (ES256), as public apps must.
//
//   PHIVAULT_BIN   the phivault binary (required)
//   CHROMIUM       the Chromium binary (default /usr/bin/chromium)
import { chromium } from "playwright-core";
import { spawn, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import os from "node:os";
import path from "node:path";

const BIN = process.env.PHIVAULT_BIN;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const PASSWORD = "lattice-bramble-ocean-9";
if (!BIN || !fs.existsSync(BIN)) {
  console.error("login.test.mjs: set PHIVAULT_BIN to the phivault binary");
  process.exit(2);
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

function b64url(buf) {
  return Buffer.from(buf).toString("base64url");
}

function cli(args, input = "") {
  const r = spawnSync(BIN, args, { input, encoding: "utf8" });
  if (r.status !== 0) throw new Error(`phivault ${args[0]} ${args[1]}: ${r.stderr}`);
  return r.stdout;
}

function base32Decode(s) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0, acc = 0;
  const out = [];
  for (const c of s) {
    acc = (acc << 5) | alphabet.indexOf(c);
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      out.push((acc >> bits) & 0xff);
    }
  }
  return Buffer.from(out);
}

// RFC 6238 TOTP (HMAC-SHA1, 6 digits, 30 s), as an authenticator app computes it
function totp(secret, unixSeconds) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(unixSeconds / 30)));
  const mac = crypto.createHmac("sha1", secret).update(counter).digest();
  const off = mac[mac.length - 1] & 0x0f;
  const bin = (mac.readUInt32BE(off) & 0x7fffffff) % 1_000_000;
  return String(bin).padStart(6, "0");
}

// The app's DPoP key and proofs (RFC 9449 §4): an ES256 JWS with the public key in its
// header, for one method and URI, and the access token's hash when it presents one.
const dpopKey = crypto.generateKeyPairSync("ec", { namedCurve: "P-256" });
const dpopJwk = (({ kty, crv, x, y }) => ({ kty, crv, x, y }))(dpopKey.publicKey.export({ format: "jwk" }));
function dpopProof(htm, htu, accessToken) {
  const header = b64url(JSON.stringify({ typ: "dpop+jwt", alg: "ES256", jwk: dpopJwk }));
  const claims = { jti: crypto.randomUUID(), htm, htu, iat: Math.floor(Date.now() / 1000) };
  if (accessToken) claims.ath = b64url(crypto.createHash("sha256").update(accessToken).digest());
  const payload = b64url(JSON.stringify(claims));
  const sig = crypto.sign("sha256", Buffer.from(`${header}.${payload}`), {
    key: dpopKey.privateKey, dsaEncoding: "ieee-p1363",
  });
  return `${header}.${payload}.${b64url(sig)}`;
}

function request(method, url, { ca, headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const req = https.request(url, { method, ca, headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () =>
        resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }),
      );
    });
    req.on("error", reject);
    if (body) req.write(body);
    req.end();
  });
}

// A SMART Backend Services token (ES384 client assertion), to load the patient.
async function backendToken(origin, ca, creds) {
  const key = crypto.createPrivateKey({ key: creds.private_jwk, format: "jwk" });
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "ES384", typ: "JWT", kid: creds.private_jwk.kid }));
  const claims = b64url(JSON.stringify({
    iss: creds.client_id, sub: creds.client_id, aud: creds.token_url,
    exp: now + 240, jti: crypto.randomUUID(),
  }));
  const sig = crypto.sign("sha384", Buffer.from(`${header}.${claims}`), { key, dsaEncoding: "ieee-p1363" });
  const form = new URLSearchParams({
    grant_type: "client_credentials",
    scope: "system/*.cruds",
    client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    client_assertion: `${header}.${claims}.${b64url(sig)}`,
  }).toString();
  const r = await request("POST", `${origin}/auth/token`, {
    ca, body: form, headers: { "content-type": "application/x-www-form-urlencoded" },
  });
  if (r.status !== 200) throw new Error(`backend token: ${r.status} ${r.body}`);
  return JSON.parse(r.body).access_token;
}

async function main() {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "phivault-browser-"));
  const data = path.join(tmp, "data");
  const server = spawn(BIN, ["serve", "--data-dir", data, "--listen", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const cleanups = [() => server.kill("SIGTERM"), () => fs.rmSync(tmp, { recursive: true, force: true })];
  try {
    const origin = await new Promise((resolve, reject) => {
      let buf = "";
      server.stdout.on("data", (d) => {
        buf += d;
        const m = buf.match(/listening on (https:\/\/\S+)/);
        if (m) resolve(m[1]);
      });
      server.on("exit", (c) => reject(new Error(`server exited ${c}`)));
    });
    const base = `${origin}/fhir`;
    const ca = fs.readFileSync(path.join(data, "tls", "ca.pem"));

    // a patient record, loaded by a back-end client
    const credsFile = path.join(tmp, "creds.json");
    cli(["client", "add", "--data-dir", data, "--name", "loader", "--scope", "system/*.cruds",
      "--token-url", `${origin}/auth/token`, "--out", credsFile]);
    const backend = await backendToken(origin, ca, JSON.parse(fs.readFileSync(credsFile, "utf8")));
    const created = await request("POST", `${base}/Patient`, {
      ca,
      headers: { authorization: `Bearer ${backend}`, "content-type": "application/fhir+json" },
      body: JSON.stringify({ resourceType: "Patient", name: [{ family: "Okafor", given: ["Ada"] }], birthDate: "1984-05-06" }),
    });
    check(created.status === 201, "patient created");
    const patientId = JSON.parse(created.body).id;

    // the app's redirect URI: a local listener that receives the code
    let landed;
    const landedPromise = new Promise((resolve) => { landed = resolve; });
    const cb = http.createServer((req, res) => {
      res.end("the app received the callback");
      landed(new URL(req.url, "http://127.0.0.1"));
    });
    await new Promise((r) => cb.listen(0, "127.0.0.1", r));
    cleanups.push(() => cb.close());
    const redirect = `http://127.0.0.1:${cb.address().port}/cb`;

    const app = JSON.parse(cli(["app", "add", "--data-dir", data, "--name", "Browser test app",
      "--redirect-uri", redirect, "--scope", "patient/*.rs openid fhirUser launch/patient"]));
    const uri = cli(["user", "add", "--data-dir", data, "--username", "ada.okafor", "--role", "patient",
      "--patient", patientId], `${PASSWORD}\n`).trim();
    const secret = base32Decode(new URL(uri).searchParams.get("secret"));

    const verifier = b64url(crypto.randomBytes(48));
    const challenge = b64url(crypto.createHash("sha256").update(verifier).digest());
    const state = b64url(crypto.randomBytes(16));
    const authorize = `${origin}/auth/authorize?` + new URLSearchParams({
      response_type: "code", client_id: app.client_id, redirect_uri: redirect,
      scope: "patient/Patient.rs openid fhirUser launch/patient", state, aud: base,
      code_challenge: challenge, code_challenge_method: "S256",
    });

    // the browser: sign in with password + TOTP, approve
    const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
    cleanups.unshift(() => browser.close());
    // the development CA is not in the browser's trust store
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    const page = await context.newPage();
    const scripts = [];
    page.on("request", (r) => { if (r.resourceType() === "script") scripts.push(r.url()); });
    await page.goto(authorize);
    check((await page.title()).startsWith("Sign in"), "login page shown");
    await page.getByLabel("Username").fill("ada.okafor");
    await page.getByLabel("Password").fill(PASSWORD);
    await page.getByLabel("Authenticator code").fill(totp(secret, Date.now() / 1000));
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.waitForLoadState();
    check((await page.title()).startsWith("Allow access?"), "consent page shown after password + TOTP");
    check((await page.content()).includes("patient/Patient.rs"), "consent lists the scopes");
    await page.getByRole("button", { name: "Allow" }).click();
    const at = await landedPromise;
    check(at.pathname === "/cb", "the browser landed at the app's redirect URI");
    check(at.searchParams.get("state") === state, "state returned");
    const code = at.searchParams.get("code");
    check(typeof code === "string" && code.length >= 43, "authorization code delivered");
    check(scripts.length === 0, "the pages load no scripts");

    // the app: exchange the code with its PKCE verifier and a DPoP proof, read the patient
    const tokenUrl = `${origin}/auth/token`;
    const tok = await request("POST", tokenUrl, {
      ca, headers: { "content-type": "application/x-www-form-urlencoded", dpop: dpopProof("POST", tokenUrl) },
      body: new URLSearchParams({ grant_type: "authorization_code", code, redirect_uri: redirect,
        client_id: app.client_id, code_verifier: verifier }).toString(),
    });
    check(tok.status === 200, `token exchange (${tok.status})`);
    const t = JSON.parse(tok.body);
    check(t.token_type === "DPoP", "a DPoP-bound token");
    check(t.patient === patientId, "patient context");
    const patientUrl = `${base}/Patient/${patientId}`;
    const read = await request("GET", patientUrl, {
      ca, headers: { authorization: `DPoP ${t.access_token}`, dpop: dpopProof("GET", patientUrl, t.access_token) },
    });
    check(read.status === 200 && JSON.parse(read.body).name[0].family === "Okafor", "the app reads the patient");
    const stolen = await request("GET", patientUrl, {
      ca, headers: { authorization: `Bearer ${t.access_token}` },
    });
    check(stolen.status === 401, "the token alone, without the app's key, is refused");
    console.log("browser sign-in test passed");
  } finally {
    for (const c of cleanups) {
      try { await c(); } catch { /* best effort */ }
    }
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
