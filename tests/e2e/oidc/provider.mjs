// A real OpenID provider for the dashboard's sign-in tests: node-oidc-provider (a certified
// OpenID Connect implementation) over HTTPS on 127.0.0.1, with one confidential client and the
// users of a JSON config file. Its sign-in page checks passwords; a disabled user is refused with
// access_denied, a removed one is unknown. Usage: node provider.mjs CONFIG.json
//
// CONFIG: {"port", "issuer", "cert", "key", "client": {"client_id", "client_secret",
//          "redirect_uris": [...]}, "users": {"name": {"password", "email", "groups": [...],
//          "disabled": false}}}
import fs from 'node:fs';
import https from 'node:https';
import { parse } from 'node:querystring';

import Provider from 'oidc-provider';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const users = config.users;
const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const provider = new Provider(config.issuer, {
  clients: [
    {
      ...config.client,
      post_logout_redirect_uris: config.client.redirect_uris,
      grant_types: ['authorization_code'],
      response_types: ['code'],
    },
  ],
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  // The scopes' claims in the ID token itself (Streamlit reads the ID token, not /userinfo).
  conformIdTokenClaims: false,
  cookies: { keys: ['test-only-cookie-key'] },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      // Confirm the sign-out at once (the default page asks "Do you want to sign-out?").
      logoutSource: async (ctx, form) => {
        const confirmed = form.replace('</form>', '<input type="hidden" name="logout" value="yes"/></form>');
        ctx.body = `<!DOCTYPE html><html><body>${confirmed}<script>document.forms[0].submit()</script></body></html>`;
      },
    },
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(ctx, id) {
    const user = users[id];
    if (!user || user.disabled) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: user.email,
          email_verified: true,
          name: id,
          preferred_username: id,
          groups: user.groups,
        };
      },
    };
  },
  // A first-party client: the user is not asked to consent (the hospital's own application).
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid email profile groups');
    await grant.save();
    return grant;
  },
});

function page(uid, message = '') {
  return `<!DOCTYPE html><html><head><title>Hospital sign-in</title></head><body>
<h1>Hospital sign-in</h1>${message ? `<p role="alert">${escape(message)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login">
<label>Hospital username <input name="login" autocomplete="username"></label>
<label>Hospital password <input name="password" type="password"></label>
<button type="submit">Sign in</button></form></body></html>`;
}

async function body(req) {
  let text = '';
  for await (const chunk of req) text += chunk;
  return parse(text);
}

async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html' }).end(page(details.uid));
    return;
  }
  const { login, password } = await body(req);
  const user = users[login];
  if (!user || user.password !== password) {
    res.writeHead(200, { 'content-type': 'text/html' }).end(page(details.uid, 'Wrong username or password.'));
    return;
  }
  if (user.disabled) {
    await provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'this account is disabled' });
    return;
  }
  await provider.interactionFinished(req, res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
}

const callback = provider.callback();
const server = https.createServer({ cert: fs.readFileSync(config.cert), key: fs.readFileSync(config.key) }, (req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((err) => {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(String(err));
    });
  } else {
    callback(req, res);
  }
});
server.listen(config.port, '127.0.0.1', () => console.log(`oidc-provider listening on ${config.issuer}`));
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
