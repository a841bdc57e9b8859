// A frontend's dev server in front of the gateway, as webpack-dev-server and
// create-react-app set one up: Express, `compression` for every answer, and the
// API passed through by http-proxy-middleware. Prints {"port": N} once listening.
const express = require("express");
const compression = require("compression");
const { createProxyMiddleware } = require("http-proxy-middleware");

const app = express();
app.use(compression());
app.use(createProxyMiddleware({ target: process.argv[2], changeOrigin: true }));
const server = app.listen(0, "127.0.0.1", () => {
  console.log(JSON.stringify({ port: server.address().port }));
});
process.on("SIGTERM", () => process.exit(0));
