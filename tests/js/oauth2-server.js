// oauth2-mock-server (npm) for the OAuth2 tests: tokens that live a few seconds, and a line on
// stdout for every token issued, so the test can count refreshes.
//
//   node tests/js/oauth2-server.js PORT [TOKEN_SECONDS]
const { OAuth2Server } = require('oauth2-mock-server');

const port = Number(process.argv[2]);
const ttl = Number(process.argv[3] || 2);

(async () => {
  const server = new OAuth2Server();
  await server.issuer.keys.generate('RS256');
  server.service.on('beforeTokenSigning', (token) => {
    token.payload.exp = Math.floor(Date.now() / 1000) + ttl;
    // A token id, as real servers add: two tokens signed in the same second differ.
    token.payload.jti = require('node:crypto').randomUUID();
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
