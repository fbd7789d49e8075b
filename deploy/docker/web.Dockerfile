# syntax=docker/dockerfile:1
# Chatify's chat page (web/): the static files and socket.io-client from npm, served by
# web/serve.mjs on port 3000. From the repository root:
#   docker build -f deploy/docker/web.Dockerfile -t chatify-web .
# deploy/docker-compose.yml builds it as the `web` service. Settings: CHATIFY_WEB_HOST,
# CHATIFY_WEB_PORT, CHATIFY_LB_PORT (the load balancer's port on the page's host) or
# CHATIFY_WEB_SERVER_URL (see web/serve.mjs).

ARG NODE_VERSION=20
FROM node:${NODE_VERSION}-bookworm-slim AS web
WORKDIR /app
# The lock pins socket.io-client; no dependency has an install script.
COPY web/package.json web/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=warn && npm cache clean --force
COPY web/serve.mjs ./
COPY web/public public
USER node
ENV NODE_ENV=production \
    CHATIFY_WEB_HOST=0.0.0.0 \
    CHATIFY_WEB_PORT=3000
EXPOSE 3000
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.CHATIFY_WEB_PORT || 3000) + '/healthz').then((r) => process.exit(r.status === 200 ? 0 : 1), () => process.exit(1))"]
CMD ["node", "serve.mjs"]
