// oauth2-mock-server (npm) for the OAuth2 tests: tokens that live a few seconds, and a line on
// stdout for every token issued, so the test can count refreshes.
//
//   node tests/js/oauth2-server.js PORT [TOKEN_SECONDS]
//
// The token request's own fields tenant, roles (comma-separated), nbf_in and exp_in (seconds from
// now) become the token's claims; "rotate" on stdin adds a signing key.
const { OAuth2Server } = require('oauth2-mock-server');

const port = Number(process.argv[2]);
const ttl = Number(process.argv[3] || 2);

(async () => {
  const server = new OAuth2Server();
  await server.issuer.keys.generate('RS256');
  server.service.on('beforeTokenSigning', (token, req) => {
    const now = Math.floor(Date.now() / 1000);
    token.payload.exp = now + ttl;
    // A token id, as real servers add: two tokens signed in the same second differ.
    token.payload.jti = require('node:crypto').randomUUID();
    // Claims a test asks for (as an identity provider maps a client's attributes).
    const body = (req && req.body) || {};
    // The client is the subject of its own client-credentials token (as Auth0 and Okta say).
    if (!token.payload.sub && body.client_id) token.payload.sub = body.client_id;
    if (body.tenant) token.payload.tenant = body.tenant;
    if (body.roles) token.payload.roles = String(body.roles).split(',');
    if (body.nbf_in) token.payload.nbf = now + Number(body.nbf_in);
    if (body.exp_in) token.payload.exp = now + Number(body.exp_in);
  });
  // A line "rotate" on stdin adds a new signing key (tokens are signed with the keys in turn).
  process.stdin.on('data', async (data) => {
    if (String(data).includes('rotate')) {
      const key = await server.issuer.keys.generate('RS256');
      console.log(JSON.stringify({ event: 'rotated', kid: key.kid }));
    }
  });
  server.service.on('beforeResponse', (response, req) => {
    if (response.body && response.body.access_token) {
      response.body.expires_in = ttl;
      if (req.body.grant_type === 'refresh_token') {
        response.body.refresh_token = `rotated-${Date.now()}`;
      }
    }
    console.log(JSON.stringify({
      event: 'token',
      grant_type: req.body.grant_type,
      client_id: req.body.client_id || null,
      basic_auth: (req.headers.authorization || '').startsWith('Basic '),
      scope: req.body.scope || null,
      audience: req.body.audience || null,
      refresh_token: req.body.refresh_token || null,
    }));
  });
  await server.start(port, '127.0.0.1');
  console.log(JSON.stringify({ event: 'ready', issuer: server.issuer.url }));
})();
