// Dataset upload: drag-and-drop or pick a file, send it to /v1/files with a progress bar,
// then open its page. Errors are shown as the API's sentence, with every line error listed.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const input = document.getElementById("upload-file");
  const zone = document.getElementById("drop-zone");
  const progress = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  const errorBox = document.getElementById("upload-error");
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;

  function showError(message, lines) {
    errorBox.hidden = false;
    errorBox.textContent = message;
    if (lines && lines.length) {
      const list = document.createElement("ul");
      lines.forEach(function (line) {
        const item = document.createElement("li");
        item.textContent = line;
        list.appendChild(item);
      });
      errorBox.appendChild(list);
    }
  }

  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (event) {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function () { zone.classList.remove("dragging"); });
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      status.textContent = "Ready to upload " + input.files[0].name + ".";
    }
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    errorBox.hidden = true;
    errorBox.textContent = "";
    if (!input.files.length) {
      showError("Choose a file to upload first.");
      return;
    }
    const data = new FormData();
    data.append("purpose", document.getElementById("upload-purpose").value);
    data.append("file", input.files[0]);
    const request = new XMLHttpRequest();
    request.open("POST", form.dataset.api);
    request.setRequestHeader("X-CSRFToken", csrf);
    request.setRequestHeader("Accept", "application/json");
    progress.hidden = false;
    progress.value = 0;
    request.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) {
        progress.value = Math.round((e.loaded / e.total) * 100);
        status.textContent = "Uploading… " + progress.value + "%";
      }
    });
    request.upload.addEventListener("load", function () {
      status.textContent = "Uploaded; checking every row…";
    });
    request.addEventListener("load", function () {
      let body = null;
      try { body = JSON.parse(request.responseText); } catch (ignored) { body = null; }
      if (request.status === 200 && body) {
        status.textContent = "Done.";
        window.location.assign(form.dataset.detail + body.id);
        return;
      }
      progress.hidden = true;
      status.textContent = "";
      const message = body && body.error ? body.error.message : "The upload failed (HTTP " + request.status + ").";
      showError(message, body && body.details ? body.details.errors : null);
    });
    request.addEventListener("error", function () {
      progress.hidden = true;
      showError("The connection was lost during the upload; nothing was stored. Try again.");
    });
    request.send(data);
  });
})();
