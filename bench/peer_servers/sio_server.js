// Node socket.io peer: clients emit "settings" {games} to join rooms; a publisher emits
// "publish" (game, payload) and every member of the room receives "incident" payload.
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.argv[2]);
const httpServer = http.createServer();
const io = new Server(httpServer, { transports: ['websocket'], perMessageDeflate: false, serveClient: false });

io.on('connection', (socket) => {
  socket.on('settings', (data) => {
    const games = (data && data.games) || [];
    for (const game of games) socket.join(game);
    socket.emit('settings', { games });
  });
  socket.on('publish', (game, payload) => {
    io.to(game).emit('incident', payload);
  });
});
httpServer.listen(port, '127.0.0.1', () => console.log('listening', port));
