// Headless authorization-code login (PKCE S256) against provider.mjs.
//
//   node login.mjs <issuer> <username> <scope> <resource>
//
// Drives the dev-interaction login and consent pages with fetch, carrying
// cookies by hand, stops at the redirect to the client's redirect_uri,
// exchanges the code and prints the access token (the JWT) on stdout.
import { createHash, randomBytes } from 'node:crypto';

const CLIENT_ID = 'ehr-portal';
const CLIENT_SECRET = 'portal-secret-0123456789';
const REDIRECT_URI = 'https://portal.example/cb';

const [issuer, username, scope, resource] = process.argv.slice(2);
if (!issuer || !username || !scope || !resource) {
  console.error('usage: node login.mjs <issuer> <username> <scope> <resource>');
  process.exit(2);
}

function fail(msg) {
  throw new Error(msg);
}

// Minimal cookie jar keyed by name (all cookies come from the one issuer).
const jar = new Map();
function storeCookies(res) {
  for (const line of res.headers.getSetCookie()) {
    const [pair, ...attrs] = line.split(';');
    const eq = pair.indexOf('=');
    const name = pair.slice(0, eq).trim();
    const expired = attrs.some((a) => /^\s*max-age=0\s*$/i.test(a)
      || (/^\s*expires=/i.test(a) && Date.parse(a.split('=')[1]) <= Date.now()));
    if (expired) jar.delete(name); else jar.set(name, pair.slice(eq + 1).trim());
  }
}
// Visible text of an (error) page, for messages.
const pageText = (html) => html.replace(/<(style|script)[\s\S]*?<\/\1>/g, '')
  .replace(/<[^>]+>/g, ' ').replace(/\s+/g, ' ').trim().slice(0, 500);

const cookieHeader = () => [...jar].map(([k, v]) => `${k}=${v}`).join('; ');

// One request without following redirects; cookies in and out.
async function request(url, { method = 'GET', form } = {}) {
  const res = await fetch(url, {
    method,
    redirect: 'manual',
    headers: {
      cookie: cookieHeader(),
      ...(form && { 'content-type': 'application/x-www-form-urlencoded' }),
    },
    body: form && new URLSearchParams(form),
  });
  storeCookies(res);
  return res;
}

async function main() {
  const discovery = await (await fetch(new URL('/.well-known/openid-configuration', issuer))).json();

  // PKCE S256 and state.
  const verifier = randomBytes(32).toString('base64url');
  const challenge = createHash('sha256').update(verifier).digest('base64url');
  const state = randomBytes(16).toString('base64url');

  const auth = new URL(discovery.authorization_endpoint);
  auth.search = new URLSearchParams({
    client_id: CLIENT_ID,
    response_type: 'code',
    redirect_uri: REDIRECT_URI,
    scope,
    state,
    resource,
    code_challenge: challenge,
    code_challenge_method: 'S256',
  });

  // Follow provider redirects and submit the login / consent forms until
  // the provider redirects to REDIRECT_URI (which is not followed).
  let res = await request(auth);
  let callback;
  for (let step = 0; step < 12 && !callback; step += 1) {
    if (res.status >= 300 && res.status < 400) {
      const location = new URL(res.headers.get('location'), res.url || auth);
      if (location.href.startsWith(REDIRECT_URI)) callback = location;
      else res = await request(location);
      continue;
    }
    const html = await res.text();
    if (res.status !== 200) fail(`HTTP ${res.status} from ${res.url}: ${pageText(html)}`);
    const action = html.match(/<form[^>]*action="([^"]+)"/)?.[1]?.replaceAll('&amp;', '&');
    const prompt = html.match(/name="prompt" value="([^"]+)"/)?.[1];
    if (!action || !prompt) fail(`no login/consent form in page from ${res.url}`);
    const form = prompt === 'login'
      ? { prompt, login: username, password: 'any-password' }
      : { prompt }; // consent: "Continue"
    res = await request(new URL(action, res.url), { method: 'POST', form });
  }
  if (!callback) fail('authorization flow did not reach the redirect_uri');

  const params = callback.searchParams;
  if (params.get('error')) fail(`authorization error: ${params.get('error')}: ${params.get('error_description')}`);
  if (params.get('state') !== state) fail('state mismatch in authorization response');
  const code = params.get('code') || fail('no code in authorization response');

  // Code exchange: client_secret_post + code_verifier + resource.
  const tokenRes = await fetch(discovery.token_endpoint, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'authorization_code',
      code,
      redirect_uri: REDIRECT_URI,
      code_verifier: verifier,
      resource,
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
    }),
  });
  const tokens = await tokenRes.json();
  if (!tokenRes.ok) fail(`token endpoint HTTP ${tokenRes.status}: ${JSON.stringify(tokens)}`);
  if (!tokens.access_token) fail(`no access_token in token response: ${JSON.stringify(tokens)}`);
  if (tokens.access_token.split('.').length !== 3) fail(`access token is not a JWT: ${tokens.access_token}`);
  process.stdout.write(`${tokens.access_token}\n`);
}

main().catch((err) => {
  console.error(`login.mjs: ${err.message}${err.cause ? ` (${err.cause.message ?? err.cause})` : ''}`);
  process.exit(1);
});
