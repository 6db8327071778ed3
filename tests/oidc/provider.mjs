// Test-only OpenID Connect provider for phivault integration tests.
//
//   AUDIENCE=https://127.0.0.1:8443/fhir KEYS_DIR=/tmp/keys KEYS=a [PORT=0] node provider.mjs serve
//
// Listens on 127.0.0.1 (plain HTTP, loopback only), prints exactly one line
// `issuer http://127.0.0.1:<port>` on stdout when ready, and serves until
// SIGTERM/SIGINT. Access tokens are RFC 9068 JWTs (typ at+jwt) for AUDIENCE,
// signed RS256 with the first key in KEYS; the JWKS lists all keys in KEYS.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { generateKeyPairSync } from 'node:crypto';
import { createServer } from 'node:http';
import { join } from 'node:path';

import Provider, { errors } from 'oidc-provider';

// stdout carries only the `issuer ...` line; oidc-provider prints its
// development notices with console.info, so send those to stderr.
console.info = console.log = console.error;

function fail(msg) {
  console.error(`provider.mjs: ${msg}`);
  process.exit(2);
}

if (process.argv[2] !== 'serve') fail('usage: node provider.mjs serve');
const { AUDIENCE, KEYS_DIR, KEYS, PORT = '0' } = process.env;
if (!AUDIENCE) fail('AUDIENCE is required');
if (!KEYS_DIR) fail('KEYS_DIR is required');
if (!KEYS) fail('KEYS is required (e.g. "a" or "b,a")');

// SMART on FHIR scopes the resource server (phivault) accepts.
const RS_SCOPES = 'openid user/Patient.rs user/Observation.rs patient/Patient.rs patient/Observation.rs';

// Load KEYS_DIR/<name>.json, or create it once (RS256, RSA-2048, kid = name)
// so the same key survives provider restarts.
function loadOrCreateKey(name) {
  const file = join(KEYS_DIR, `${name}.json`);
  if (existsSync(file)) return JSON.parse(readFileSync(file, 'utf8'));
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: name, alg: 'RS256', use: 'sig' };
  writeFileSync(file, `${JSON.stringify(jwk, null, 2)}\n`, { mode: 0o600 });
  return jwk;
}
// Order matters: the first key is the one oidc-provider selects for signing.
const keys = KEYS.split(',').map((k) => k.trim()).filter(Boolean).map(loadOrCreateKey);

// Listen first so an ephemeral port (PORT=0) is known before building the issuer.
const server = createServer();
server.on('error', (err) => fail(`cannot listen on 127.0.0.1:${PORT}: ${err.message}`));
server.listen(Number(PORT), '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;

  const provider = new Provider(issuer, {
    clients: [{
      client_id: 'ehr-portal',
      client_secret: 'portal-secret-0123456789',
      token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['authorization_code'],
      response_types: ['code'],
      redirect_uris: ['https://portal.example/cb'],
    }],
    jwks: { keys },
    cookies: { keys: ['phivault-oidc-test-cookie-key-5f1c2a9e7d3b'] },
    scopes: RS_SCOPES.split(' '),
    // oidc-provider requires PKCE only for public clients by default;
    // require it for every client, and allow only S256.
    pkce: { methods: ['S256'], required: () => true },
    // Any login name is a valid account id.
    findAccount: (ctx, id) => ({
      accountId: id,
      claims: () => ({ sub: id, preferred_username: id }),
    }),
    // preferred_username in access tokens issued for an account.
    extraTokenClaims: (ctx, token) => (
      token.accountId ? { preferred_username: token.accountId } : undefined
    ),
    features: {
      devInteractions: { enabled: true }, // login + consent pages driven by login.mjs
      resourceIndicators: {
        enabled: true,
        defaultResource: () => AUDIENCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource) => {
          if (resource !== AUDIENCE) throw new errors.InvalidTarget();
          return {
            scope: RS_SCOPES,
            audience: AUDIENCE,
            accessTokenTTL: 300,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
  });

  // Unexpected errors would otherwise only show up as a bare HTTP 500.
  provider.on('server_error', (ctx, err) => console.error('server_error:', err));
  server.on('request', provider.callback());
  process.stdout.write(`issuer ${issuer}\n`);
});

// Graceful stop: close the listener (and idle keep-alive sockets), exit 0.
function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
